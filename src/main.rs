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

    /// Signal the podgate running on this config (found through `server.pid_file`): `reload`
    /// re-reads the config (SIGHUP), `stop` stops gracefully (SIGTERM). The config is checked
    /// first: a bad one is reported and nothing is sent.
    #[arg(short = 's', long = "signal", value_name = "SIGNAL", value_enum)]
    signal: Option<SignalCmd>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum SignalCmd {
    Reload,
    Stop,
}

/// Pingora allocates per request (headers, tasks, buffers); mimalloc's thread-local free lists
/// serve that pattern better than glibc's arenas (benches/RESULTS.md has the measured effect).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Keeps this process off transparent huge pages, except where it asks for them. mimalloc
/// reserves its arenas as large aligned regions, and with THP each touched 2 MiB of them becomes
/// resident whole: with 10,000 endpoints RSS was 68 MiB with THP and 38 MiB without, at no
/// measured cost in req/s (benches/RESULTS.md). The `no_thp` feature stops mimalloc from asking
/// for huge pages on hosts where THP is `madvise`; this covers hosts where it is `always`.
/// The one region podgate does ask for (`MADV_HUGEPAGE`: a consistent-hash ring's points, read
/// at random, see `upstream/policy/hash.rs`) keeps them where the kernel can tell the two apart
/// (`PR_THP_DISABLE_EXCEPT_ADVISED`, Linux 6.18); older kernels refuse that flag, and then THP is
/// off for everything, as before.
#[cfg(target_os = "linux")]
fn no_transparent_huge_pages() {
    /// `PR_THP_DISABLE_EXCEPT_ADVISED` of linux/prctl.h (not in the libc crate yet).
    const EXCEPT_ADVISED: libc::c_ulong = 1 << 1;
    // SAFETY: PR_SET_THP_DISABLE takes integers only and sets a flag on this process; it
    // touches no memory of ours. Failure (an old kernel) leaves THP as the host has it.
    let r = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, EXCEPT_ADVISED, 0, 0) };
    if r != 0 {
        // SAFETY: as above.
        let _ = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    }
}

/// EX_USAGE from sysexits.h, as for a bad command line.
const EXIT_BAD_CONFIG: u8 = 64;

fn main() -> ExitCode {
    #[cfg(target_os = "linux")]
    no_transparent_huge_pages();
    let cli = Cli::parse();
    podgate::logging::RateLimited::init();
    podgate::logging::TracingToLog::init();

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
    if let Some(cmd) = cli.signal {
        return match signal_running(&config.server.pid_file, cmd) {
            Ok(pid) => {
                let what = match cmd {
                    SignalCmd::Reload => "reload (SIGHUP)",
                    SignalCmd::Stop => "stop (SIGTERM)",
                };
                println!("podgate: sent {what} to pid {pid}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("podgate: {e}");
                ExitCode::from(1)
            }
        };
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

/// Sends `cmd` to the process named in `pid_file`, after making sure that process is a podgate
/// (a stale file may name a pid that now belongs to something else).
fn signal_running(pid_file: &std::path::Path, cmd: SignalCmd) -> Result<i32, String> {
    // A podgate removes its pid file when it stops.
    let text = std::fs::read_to_string(pid_file).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => format!(
            "no pid file {}: podgate is not running with this config",
            pid_file.display()
        ),
        _ => format!("cannot read the pid file {}: {e}", pid_file.display()),
    })?;
    let pid: i32 = text
        .trim()
        .parse()
        .ok()
        .filter(|p| *p > 1)
        .ok_or_else(|| format!("{} holds {:?}, not a pid", pid_file.display(), text.trim()))?;
    let comm = |p: &str| std::fs::read_to_string(format!("/proc/{p}/comm")).ok();
    match comm(&pid.to_string()) {
        None => {
            return Err(format!(
                "no process {pid} (from {}): podgate is not running",
                pid_file.display()
            ))
        }
        Some(theirs) if Some(&theirs) != comm("self").as_ref() => {
            return Err(format!(
                "process {pid} (from {}) is {:?}, not podgate: the pid file is stale",
                pid_file.display(),
                theirs.trim()
            ))
        }
        Some(_) => {}
    }
    let sig = match cmd {
        SignalCmd::Reload => libc::SIGHUP,
        SignalCmd::Stop => libc::SIGTERM,
    };
    // SAFETY: kill takes plain integers; `pid` was checked to be a podgate process above.
    if unsafe { libc::kill(pid, sig) } != 0 {
        return Err(format!(
            "cannot signal process {pid}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(pid)
}
