//! The answer's body on its way from the Pod to the client, after the head went out; with a
//! duplex client and Pod (h2 to h2: gRPC streaming calls) the request body keeps flowing the
//! other way at the same time, each direction as its receiver takes it.

use super::record::Record;
use super::sides::{AnswerEvent, AnswerTx, BodyEvent, ClientFail, ClientSide, PodAnswer, Trailers};
use super::upload::Upload;

/// How a relay ended.
pub(crate) enum Relayed {
    /// The whole answer reached the client.
    Done,
    /// The client went away, or the answer broke off (the client saw it cut).
    Broken,
}

/// Relays the rest of `answer` to the client (and, duplex, the rest of the body to the Pod);
/// counts the body bytes and a gRPC call's final status into `rec`.
pub(crate) async fn relay<C: ClientSide, A: PodAnswer>(
    client: &mut C,
    answer: &mut A,
    upload: &mut Upload,
    rec: &mut Record,
    grpc: bool,
) -> Relayed {
    let (mut rx, mut tx) = client.halves();
    let mut trailers: Option<Option<Trailers>> = None;
    loop {
        if let Some(t) = trailers.take_if(|_| !tx.busy()) {
            if grpc {
                if let Some(v) = t.as_ref().and_then(|t| t.get("grpc-status")) {
                    rec.grpc_status = Some(crate::proxy::h2::grpc::status_index(v));
                }
            }
            return match tx.finish(t).await {
                Ok(()) => Relayed::Done,
                Err(ended) => {
                    rec.ended = Some(ended);
                    answer.cancel();
                    Relayed::Broken
                }
            };
        }
        let read = trailers.is_none() && tx.wants_more();
        let upload_open = C::DUPLEX && !upload.ended() && answer.wants_upload();
        tokio::select! {
            event = answer.next(read), if read || answer.upload_busy() => match event {
                AnswerEvent::Data(data) => {
                    rec.bytes += data.len() as u64;
                    tx.queue(data);
                }
                AnswerEvent::End(t) => trailers = Some(t),
                AnswerEvent::Failed(ended) => {
                    rec.ended = Some(ended);
                    tx.abort();
                    return Relayed::Broken;
                }
                AnswerEvent::Uploaded => {}
            },
            sent = tx.deliver() => {
                if let Err(ended) = sent {
                    // The client went away or is too slow: so does the call.
                    rec.ended = Some(ended);
                    answer.cancel();
                    tx.abort();
                    return Relayed::Broken;
                }
            }
            event = upload.next(&mut rx), if upload_open => match event {
                BodyEvent::Data(data) => answer.upload(data, false),
                BodyEvent::End(_) => answer.upload(bytes::Bytes::new(), true),
                BodyEvent::Failed(why) => {
                    match why {
                        ClientFail::TooLarge => {
                            log::debug!("request body past max_body while the answer ran")
                        }
                        ClientFail::Gone(ended) => rec.ended = Some(ended),
                        ClientFail::Bad => {}
                    }
                    answer.cancel();
                    tx.abort();
                    return Relayed::Broken;
                }
            },
        }
    }
}
