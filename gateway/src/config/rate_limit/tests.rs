use super::*;

fn rate(s: &str) -> Result<Rate, String> {
    Rate::from_scalar(Scalar::Str(s.into()))
}

#[test]
fn rates_are_count_per_unit() {
    assert_eq!(
        rate("100/s"),
        Ok(Rate {
            count: 100,
            per_secs: 1
        })
    );
    assert_eq!(
        rate("6000/min"),
        Ok(Rate {
            count: 6000,
            per_secs: 60
        })
    );
    assert_eq!(rate("6000/m").map(|r| r.to_string()), Ok("6000/min".into()));
    assert_eq!(rate("5/h").unwrap().interval(), Duration::from_secs(720));
    assert!(rate("100/sec").unwrap_err().contains("is not a rate"));
    assert!(rate("0/s").unwrap_err().contains("at least 1"));
    assert!(rate("-1/s").is_err());
    assert!(rate("1.5/s").is_err());
    assert!(rate("100").is_err());
    assert!(rate("2000000000/s").unwrap_err().contains("1000000000/s"));
    assert!(Rate::from_scalar(Scalar::Int(100))
        .unwrap_err()
        .contains("100/s"));
}

#[test]
fn keys_are_consumer_client_ip_or_a_header() {
    let key = |s: &str| RateKey::from_scalar(Scalar::Str(s.into()));
    assert_eq!(key("consumer"), Ok(RateKey::Consumer));
    assert_eq!(key("client_ip"), Ok(RateKey::ClientIp));
    assert_eq!(
        key("header X-Tenant"),
        Ok(RateKey::Header("x-tenant".into()))
    );
    assert!(key("header").is_err());
    assert!(key("header a b").unwrap_err().contains("header name"));
    assert!(key("ip").unwrap_err().contains("consumer, client_ip"));
}

#[test]
fn urls_are_checked_without_showing_them() {
    assert_eq!(check_url("redis://127.0.0.1:6379/0", false), Ok(()));
    assert_eq!(check_url("rediss://:pw@redis.internal:6380", false), Ok(()));
    assert_eq!(check_url("unix:///run/redis.sock", false), Ok(()));
    let e = check_url("http://:secret@x", false).unwrap_err();
    assert!(e.contains("redis://") && !e.contains("secret"), "{e}");
    assert!(check_url("rediss://x/#insecure", false).is_err());
    assert!(check_url("redis://x:6379/2", true)
        .unwrap_err()
        .contains("database 0"));
    assert!(check_url("unix:///run/redis.sock", true).is_err());
    assert!(check_url("redis://127.0.0.1:99999", false).is_err());
    let debug = format!("{:?}", Secret("redis://:pw@x".into()));
    assert!(!debug.contains("pw"));
}
