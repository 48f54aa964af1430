//! The `wsgate` command: run a config, check one, proxy in one line, or print the version.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use wsgate::{config, quick, telemetry, Server};

/// Requests and handshakes allocate many small, short-lived objects (header maps, channel
/// cells, task cells); mimalloc serves those without glibc's bin management and trimming.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc hands freed pages back to the system a second after they empty (its purge delay),
/// but only when the thread next calls into it: after a burst (a reconnect storm, a wave of
/// keep-alive connections going idle and parking) a quiet proxy would keep the burst's peak.
/// A collection each second runs the purges that are due. Measured: 9,900 idle keep-alive
/// connections held 7.2 KiB of RSS each without it, 3.1 KiB with purges at once.
async fn return_freed_memory() {
    let mut each_second = tokio::time::interval(std::time::Duration::from_secs(1));
    each_second.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        each_second.tick().await;
        // SAFETY: mi_collect only walks the calling thread's own heap and the shared arenas;
        // not forcing it keeps it to pages already free and purges already due.
        unsafe { libmimalloc_sys::mi_collect(false) };
    }
}

/// Every WebSocket holds two descriptors, and containers (containerd 2, Docker 29) start
/// processes with a soft limit of 1024: about 500 tunnels. The soft limit is raised to the
/// hard one, as Go's runtime does at start; the hard limit stays the operator's to set.
fn raise_open_files_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed by reference.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return;
    }
    if limit.rlim_cur >= limit.rlim_max {
        return;
    }
    let soft = limit.rlim_cur;
    limit.rlim_cur = limit.rlim_max;
    // SAFETY: as above.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } == 0 {
        tracing::debug!(
            from = soft,
            to = limit.rlim_max,
            "raised the open files limit to its hard limit"
        );
    } else {
        tracing::warn!(
            soft,
            hard = limit.rlim_max,
            websockets = soft / 2,
            "cannot raise the open files limit: only about this many WebSockets fit"
        );
    }
}

/// A reverse proxy whose core is WebSocket passthrough.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// The configuration file (`proxy` takes none).
    #[arg(short, long, global = true, default_value = "config.toml")]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve with the configuration (the default).
    Run,
    /// Validate the configuration, print every problem, and exit 0 (valid) or 2.
    Check,
    /// Proxy one address to servers, without a config file: wsgate in one line
    ///
    /// Listens on --from and sends every request, WebSockets included, to the --to
    /// servers (least connections first, failing over while nothing has been sent).
    ///
    /// It runs a config of one listener, one route for every host and path, and one
    /// upstream, built from the flags and checked like a file: every default in the
    /// README's "Configuration" applies, and a bad value exits 2 naming its flag.
    /// Ctrl-C drains, a second one exits at once. For more, write a config.toml.
    // Wrapped by hand for an 80-column terminal (and no full stop in the summary line).
    #[command(verbatim_doc_comment)]
    Proxy(ProxyArgs),
}

/// `wsgate proxy`'s flags, which `quick` turns into a config.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  \
    wsgate proxy --from 127.0.0.1:8080 --to 127.0.0.1:9000\n  \
    wsgate proxy --from [::]:443 --to 10.0.0.5:9000 --to 10.0.0.6:9000 \\\n      \
    --tls-cert site.pem --tls-key site.key")]
struct ProxyArgs {
    /// Listen here: ip:port (port 0: any free port, named in the `listening` log line).
    #[arg(long, value_name = "IP:PORT")]
    from: String,
    /// A server: host:port, or https://host:port to speak TLS to it; repeat for more.
    #[arg(long, value_name = "SERVER", required = true)]
    to: Vec<String>,
    /// Serve HTTPS (and HTTP/2) with this PEM certificate chain; needs --tls-key.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<String>,
    /// The PEM private key for --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<String>,
    /// A log filter, e.g. "warn" or "wsgate=debug,info" [default: info; RUST_LOG wins].
    #[arg(long, value_name = "FILTER")]
    log_level: Option<String>,
}

impl ProxyArgs {
    fn flags(self) -> quick::Flags {
        // clap's `requires` lets neither come alone.
        let tls = self
            .tls_cert
            .zip(self.tls_key)
            .map(|(cert, key)| quick::TlsFiles { cert, key });
        quick::Flags {
            from: self.from,
            to: self.to,
            tls,
            log_level: self.log_level,
        }
    }
}

/// Exit status for a configuration that does not validate.
const EXIT_BAD_CONFIG: u8 = 2;
/// Exit status when a second signal cuts the drain short (128 + SIGINT, as shells report).
const EXIT_INTERRUPTED: i32 = 130;

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|err| err.exit());
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => match load(&cli.config) {
            Ok(config) => run(config, Some(cli.config)),
            Err(exit) => exit,
        },
        Command::Check => match load(&cli.config) {
            Ok(config) => check(&config, &cli.config),
            Err(exit) => exit,
        },
        Command::Proxy(args) => {
            // `--config` has a default; only one typed out is a conflict.
            let config_typed = matches.value_source("config") == Some(ValueSource::CommandLine);
            proxy(args, config_typed)
        }
    }
}

/// `wsgate proxy`: the flags' config, run as a file's is (with no file for SIGHUP to read).
fn proxy(args: ProxyArgs, config_typed: bool) -> ExitCode {
    if config_typed {
        let mut cli = Cli::command();
        cli.build();
        let usage = cli.find_subcommand_mut("proxy").expect("a subcommand");
        usage
            .error(
                ErrorKind::ArgumentConflict,
                "`wsgate proxy` takes no --config: its flags are the config",
            )
            .exit();
    }
    match quick::config(&args.flags()) {
        Ok(config) => run(config, None),
        Err(problems) => {
            for problem in &problems {
                eprintln!("{problem}");
            }
            ExitCode::from(EXIT_BAD_CONFIG)
        }
    }
}

/// The config at `path`, or every problem printed and the exit status to return.
fn load(path: &Path) -> Result<wsgate::Config, ExitCode> {
    config::load(path).map_err(|err| {
        eprintln!("{}", telemetry::error_chain(&err));
        if let config::Error::Invalid(problems) = &err {
            eprintln!("{}: {} problem(s)", path.display(), problems.len());
        }
        ExitCode::from(EXIT_BAD_CONFIG)
    })
}

fn check(config: &wsgate::Config, path: &Path) -> ExitCode {
    if let Err(err) = Server::check(config) {
        eprintln!("{}", telemetry::error_chain(&err));
        return ExitCode::from(EXIT_BAD_CONFIG);
    }
    println!(
        "{}: ok ({} listener(s), {} route(s), {} upstream(s))",
        path.display(),
        config.listeners.len(),
        config.routes.len(),
        config.upstreams.len()
    );
    ExitCode::SUCCESS
}

/// Serves `config` until a signal and its drain; `source`, the file it came from, is what
/// SIGHUP reads again.
fn run(config: wsgate::Config, source: Option<PathBuf>) -> ExitCode {
    telemetry::init(&config.log);
    raise_open_files_limit();
    let runtime = match config.workers {
        1 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        0 => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build(),
        n => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build(),
    };
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(err) => {
            tracing::error!(error = %err, "cannot start the runtime");
            return ExitCode::FAILURE;
        }
    };
    let served = runtime.block_on(async {
        // Installed before the listeners bind, so that a signal arriving as soon as wsgate
        // answers is already a drain, never the default action of dying on the spot.
        let mut signals = Signals::install()?;
        let server = Server::bind(&config, source).await?;
        let reloader = server.reloader();
        let mut hangups = signals.hup.take().expect("installed");
        tokio::spawn(async move {
            while hangups.recv().await.is_some() {
                tracing::info!("SIGHUP received: reloading the config");
                reloader.reload_from_source().await;
            }
        });
        tokio::spawn(return_freed_memory());
        server.run(signals.first()).await;
        Ok::<_, StartError>(())
    });
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = %telemetry::error_chain(&err), "cannot start");
            ExitCode::FAILURE
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum StartError {
    #[error("cannot install signal handlers")]
    Signals(#[source] std::io::Error),
    #[error(transparent)]
    Server(#[from] wsgate::server::Error),
}

struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    /// Reload the config; taken by the reload task.
    hup: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn install() -> Result<Signals, StartError> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate()).map_err(StartError::Signals)?,
            int: signal(SignalKind::interrupt()).map_err(StartError::Signals)?,
            hup: Some(signal(SignalKind::hangup()).map_err(StartError::Signals)?),
        })
    }

    /// Completes on the first SIGTERM or SIGINT; a second one exits at once.
    async fn first(mut self) {
        tokio::select! {
            _ = self.term.recv() => tracing::info!("SIGTERM received"),
            _ = self.int.recv() => tracing::info!("SIGINT received"),
        }
        tokio::spawn(async move {
            tokio::select! {
                _ = self.term.recv() => {}
                _ = self.int.recv() => {}
            }
            tracing::warn!("second signal: exiting now");
            std::process::exit(EXIT_INTERRUPTED);
        });
    }
}
