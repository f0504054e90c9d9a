//! The `podgate` package: the `podgate` binary, plus the demo Pods that the quickstart and the
//! integration tests run behind it.

pub mod demo;
pub mod logging;
