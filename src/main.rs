//! `podgate`: the gateway binary.
//!
//! Exit codes: 0 after a clean stop or a good `-t`; 64 for a bad config (before any port is
//! bound); 1 when start-up fails for another reason.

use clap::Parser;
use std::path::PathBuf;
use std::process::ExitCode;

/// An API gateway that sends every request straight to a Kubernetes Pod.
#[derive(Parser, Debug)]
#[command(name = "podgate", version, about)]
struct Cli {
    /// The config file (YAML).
    #[arg(short = 'c', long = "conf", value_name = "FILE")]
    conf: PathBuf,

    /// Check the config file, print every mistake, and exit: 0 if good, 64 if not.
    #[arg(short = 't', long = "test")]
    test: bool,

    /// Take over the listening sockets of a running podgate (send it SIGQUIT) for a
    /// zero-downtime binary upgrade.
    #[arg(short = 'u', long = "upgrade")]
    upgrade: bool,
}

/// Pingora allocates per request (headers, tasks, buffers); mimalloc's thread-local free lists
/// serve that pattern better than glibc's arenas (benches/RESULTS.md has the measured effect).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Keeps this process off transparent huge pages. mimalloc reserves its arenas as large aligned
/// regions, and with THP each touched 2 MiB of them becomes resident whole: with 10,000
/// endpoints RSS was 68 MiB with THP and 38 MiB without, at no measured cost in req/s
/// (benches/RESULTS.md). The `no_thp` feature stops mimalloc from asking for huge pages on hosts
/// where THP is `madvise`; this covers hosts where it is `always`.
#[cfg(target_os = "linux")]
fn no_transparent_huge_pages() {
    // SAFETY: PR_SET_THP_DISABLE takes integers only and sets a flag on this process; it
    // touches no memory of ours. Failure (an old kernel) leaves THP as the host has it.
    let _ = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
}

/// EX_USAGE from sysexits.h, as for a bad command line.
const EXIT_BAD_CONFIG: u8 = 64;

fn main() -> ExitCode {
    #[cfg(target_os = "linux")]
    no_transparent_huge_pages();
    let cli = Cli::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();

    let config = match podgate_gateway::config::load(&cli.conf) {
        Ok(c) => c,
        Err(errors) => {
            eprintln!(
                "podgate: {} has {} mistake(s):",
                cli.conf.display(),
                errors.0.len()
            );
            for e in &errors.0 {
                eprintln!("  {e}");
            }
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    if cli.test {
        println!("podgate: {} is valid", cli.conf.display());
        return ExitCode::SUCCESS;
    }
    let opts = podgate_gateway::server::RunOptions {
        upgrade: cli.upgrade,
    };
    match podgate_gateway::server::run(config, opts) {
        Ok(never) => match never {},
        Err(e) => {
            eprintln!("podgate: cannot start: {e}");
            ExitCode::from(1)
        }
    }
}
