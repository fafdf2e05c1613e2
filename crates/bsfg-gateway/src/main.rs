//! `bsfg`: the BSFG gateway and its command-line client.
//!
//! - `bsfg run --config zone.toml` starts a zone; `bsfg validate --config zone.toml`
//!   checks a config without starting anything.
//! - `bsfg append|fetch|confirm|put-object|pull` talk to a running gateway (`--url`).
//! - `bsfg status` and `bsfg link accept-gap` talk to a zone's admin endpoint.
//!
//! Exit codes: 0 success, 1 the operation failed, 2 bad usage or config.

mod admin;
#[cfg(feature = "bench")]
mod bench;
mod certs;
mod check;
mod client;
mod config;
mod policies;
mod registry;
mod run;
mod systemd;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use bsfg_core::component::SinkError;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "bsfg",
    version,
    about = "BSFG: Bidirectional Store-and-Forward Gateway"
)]
struct Cli {
    /// Gateway URL for client commands: grpc:// (loopback plaintext), grpcs:// or
    /// quic:// (mutual TLS: --tls-cert, --tls-key, --tls-ca).
    #[arg(
        long,
        global = true,
        env = "BSFG_URL",
        default_value = registry::DEFAULT_CLIENT_URL
    )]
    url: String,
    /// Machine-readable JSON output (one object per line).
    #[arg(long, global = true)]
    json: bool,
    /// Log lines on stderr as `text` (for people) or `json` (one object per line, the
    /// event's fields and its span's `zone`, `link`, `consumer`, `peer` as keys).
    #[arg(long, global = true, env = "BSFG_LOG_FORMAT", default_value = "text")]
    log_format: LogFormat,
    /// What to log: a level (`error`, `warn`, `info`, `debug`, `trace`) or filter
    /// directives (`info,bsfg_core=debug`). Default: RUST_LOG, else `info` (with the
    /// NATS, HTTP/2 and tower libraries at `warn`).
    #[arg(long, global = true, env = "BSFG_LOG_LEVEL")]
    log_level: Option<String>,
    #[command(flatten)]
    tls: client::TlsArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start a zone from its config file and serve until SIGINT/SIGTERM.
    Run {
        /// The zone's TOML file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Check a config file; print every problem with file, line and key.
    Validate {
        /// The zone's TOML file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Append facts: one from flags, or JSON lines with --file (`-` for stdin).
    Append {
        #[command(flatten)]
        fact: client::FactArgs,
        /// JSON lines, one `{"envelope": {...}, "fact": {...}}` per line.
        #[arg(long)]
        file: Option<PathBuf>,
        /// Facts in flight at once with --file (answers stay in input order): calls
        /// of --batch facts, as many as this allows (at least one). The first refused
        /// fact stops the run with its line number; facts already in flight past it
        /// may have been stored. Re-running the file is safe: stored facts come back
        /// as duplicates.
        #[arg(long, default_value_t = 1000)]
        concurrency: usize,
        /// Facts per AppendFacts call with --file (at most 1000).
        #[arg(long, default_value_t = 500)]
        batch: usize,
        /// Go on after the lines an earlier run of the same file had acknowledged
        /// (recorded in `<file>.bsfg-acked` after every call).
        #[arg(long)]
        resume: bool,
    },
    /// Fetch a page for a durable consumer.
    Fetch {
        /// Consumer name, declared in the zone's config.
        #[arg(long)]
        consumer: String,
        /// Most facts per page.
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Long-poll: wait this long for a first fact.
        #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
        wait: Duration,
        /// Keep fetching (long-polls of at least 5 s) until interrupted.
        #[arg(long)]
        follow: bool,
        /// Confirm each page after printing it.
        #[arg(long)]
        confirm: bool,
    },
    /// Confirm everything up to an offset for a consumer.
    Confirm {
        /// Consumer name.
        #[arg(long)]
        consumer: String,
        /// Offset (inclusive).
        #[arg(long)]
        offset: u64,
    },
    /// Pull from a source zone into the zone at --url: fetch a page, append every fact
    /// (original message_id kept), then confirm it to the source. Repeats until the
    /// source has nothing more (or forever with --follow).
    Pull {
        /// The source zone's gateway URL.
        #[arg(long)]
        source: String,
        /// The consumer name on the source.
        #[arg(long)]
        consumer: String,
        /// Page size.
        #[arg(long, default_value_t = 500)]
        limit: u32,
        /// Keep pulling (long-polls of 5 s) until interrupted.
        #[arg(long)]
        follow: bool,
        /// Pass over a gap (facts the source lost before they were confirmed), after
        /// recording it as a `gap_accepted` fact in this zone. Needs --zone.
        #[arg(long, requires = "zone")]
        accept_gap: bool,
        /// This (the destination) zone's name, for the gap record.
        #[arg(long)]
        zone: Option<String>,
        /// The source zone's name, for the report (a remote destination keeps no
        /// provenance).
        #[arg(long, default_value = "remote")]
        source_zone: String,
        /// Who accepts the gap, kept in the record.
        #[arg(long, env = "USER", default_value = "operator")]
        accepted_by: String,
    },
    /// Show each link of a running zone: state, frontier, lag, last success.
    Status {
        #[command(flatten)]
        admin: AdminArgs,
        /// Judge the zone against the runbook's thresholds (docs/operations.md) and
        /// exit like a monitoring check: 0 ok, 1 warning, 2 critical (also when the
        /// admin endpoint does not answer).
        #[arg(long)]
        check: bool,
        #[command(flatten)]
        limits: CheckLimits,
    },
    /// Try a WASM policy module without a gateway.
    Policy {
        #[command(subcommand)]
        which: PolicyCommand,
    },
    /// Facts a link's intake policies denied: list, show, release, drop (through the
    /// zone's admin endpoint).
    Quarantine {
        #[command(subcommand)]
        which: QuarantineCommand,
    },
    /// Operator commands for a running zone's links.
    Link {
        #[command(subcommand)]
        which: LinkCommand,
    },
    /// The zone's certificate authority and the certificates it issues.
    Certs {
        #[command(subcommand)]
        which: CertsCommand,
    },
    /// The zone's idempotency index.
    Index {
        #[command(subcommand)]
        which: IndexCommand,
    },
    /// Benchmarks (print numbers against a baseline measured in the same run). Built
    /// only with the `bench` feature: the shipping binary links no test emulator.
    #[cfg(feature = "bench")]
    Bench {
        #[command(subcommand)]
        which: bench::BenchCommand,
    },
    /// Store an artifact, streamed from a file.
    PutObject {
        /// Bucket.
        #[arg(long)]
        bucket: String,
        /// Key (default: the file name).
        #[arg(long)]
        key: Option<String>,
        /// The file.
        file: PathBuf,
    },
    /// Read an artifact into a file (or print its digest and size with --head). The
    /// digest of what was written is checked against the zone's.
    GetObject {
        /// Bucket.
        #[arg(long)]
        bucket: String,
        /// Key.
        #[arg(long)]
        key: String,
        /// Only the digest and size: read nothing.
        #[arg(long, conflicts_with_all = ["out", "resume"])]
        head: bool,
        /// Go on from the bytes already in OUT (an earlier read that broke off)
        /// instead of starting over.
        #[arg(long)]
        resume: bool,
        /// Where to write the bytes.
        #[arg(required_unless_present = "head")]
        out: Option<PathBuf>,
    },
}

/// Where the zone's admin endpoint is, and its token: given, or read from the zone's
/// config file.
#[derive(clap::Args)]
struct AdminArgs {
    /// The zone's admin endpoint, e.g. http://127.0.0.1:9464.
    #[arg(long, required_unless_present = "config", conflicts_with = "config")]
    admin: Option<String>,
    /// The zone's TOML file (its `[admin] listen` and `token_file` are used).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// The admin token file, for state-changing calls (default with --config: its
    /// `[admin] token_file`).
    #[arg(long, env = "BSFG_ADMIN_TOKEN_FILE")]
    token_file: Option<PathBuf>,
}

impl AdminArgs {
    fn endpoint(&self) -> anyhow::Result<client::AdminEndpoint> {
        let given = self
            .token_file
            .as_deref()
            .map(config::AdminToken::read)
            .transpose()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        if let Some(a) = &self.admin {
            return Ok(client::AdminEndpoint {
                addr: a
                    .trim_start_matches("http://")
                    .trim_end_matches('/')
                    .to_owned(),
                token: given.map(|t| t.secret().to_owned()),
            });
        }
        let path = self
            .config
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("give --admin or --config"))?;
        let c = config::load(&registry::builtin(), path)?;
        let a = c.admin.ok_or_else(|| {
            anyhow::anyhow!("{}: no [admin] listen address configured", path.display())
        })?;
        Ok(client::AdminEndpoint {
            addr: a.listen.to_string(),
            token: given.or(a.token).map(|t| t.secret().to_owned()),
        })
    }
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Load a policy module as the gateway would (same checks and limits) and print
    /// its verdict for each fact of a JSON-lines file. Nothing is stored.
    Test(client::PolicyTest),
}

#[derive(Subcommand)]
enum QuarantineCommand {
    /// List quarantined facts, oldest first.
    List {
        #[command(flatten)]
        admin: AdminArgs,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Show one quarantined fact in full (JSON).
    Show {
        #[command(flatten)]
        admin: AdminArgs,
        /// Its message_id.
        #[arg(long)]
        id: String,
        /// Its payload digest, or the start of it (`bsfg quarantine list` shows 16
        /// digits), when the message_id has several entries.
        #[arg(long)]
        payload: Option<String>,
    },
    /// Append a quarantined fact as it was fetched (the operator overrides the
    /// policy) and record who released it as a `quarantine_released` audit fact.
    Release {
        #[command(flatten)]
        admin: AdminArgs,
        /// Its message_id.
        #[arg(long)]
        id: String,
        /// Its payload digest, or the start of it, when the message_id has several
        /// entries.
        #[arg(long)]
        payload: Option<String>,
        /// Who releases it, kept in the record.
        #[arg(long, env = "USER", default_value = "operator")]
        by: String,
    },
    /// Discard a quarantined fact, recording who dropped it as a
    /// `quarantine_dropped` audit fact.
    Drop {
        #[command(flatten)]
        admin: AdminArgs,
        /// Its message_id.
        #[arg(long)]
        id: String,
        /// Its payload digest, or the start of it, when the message_id has several
        /// entries.
        #[arg(long)]
        payload: Option<String>,
        /// Who drops it, kept in the record.
        #[arg(long, env = "USER", default_value = "operator")]
        by: String,
    },
}

#[derive(Subcommand)]
enum LinkCommand {
    /// Move a gapped link past its gap deliberately. The gap (exactly FROM..=TO, as
    /// `bsfg status` shows it) is recorded as a `gap_accepted` fact in this zone.
    AcceptGap {
        #[command(flatten)]
        admin: AdminArgs,
        /// The link's name.
        #[arg(long)]
        link: String,
        /// First missing offset.
        #[arg(long)]
        from: u64,
        /// Last missing offset.
        #[arg(long)]
        to: u64,
        /// Who accepts it, kept in the record.
        #[arg(long, env = "USER", default_value = "operator")]
        by: String,
    },
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Make the zone CA: DIR/ca.pem and DIR/ca.key.
    Init(certs::Init),
    /// Issue a server and/or client certificate signed by the zone CA.
    Issue(certs::Issue),
    /// Make an admin token file (`[admin] token_file`): the credential the admin
    /// endpoint's state-changing calls need.
    AdminToken(certs::AdminTokenArgs),
}

#[derive(Subcommand)]
enum IndexCommand {
    /// Move a zone of an earlier layout (the per-id index `bsfg_ids`, or the
    /// two-stream layout `bsfg_index` beside `facts_<class>`) to the one-stream log
    /// (`bsfg_log`), once, with every gateway of the zone stopped. Facts get new
    /// offsets; consumers keep their frontiers. Does nothing on a zone of the log.
    Migrate {
        /// The zone's TOML file.
        #[arg(long, short)]
        config: PathBuf,
    },
}

/// `bsfg status --check` limits a site sets for itself (as it would edit the alerting
/// rules); unset, the runbook's.
#[derive(clap::Args, Debug, Default)]
struct CheckLimits {
    /// Seconds without a successful link step before a warning [default: 60].
    #[arg(long, value_name = "SECONDS", requires = "check")]
    stalled_warning: Option<f64>,
    /// ... before critical [default: 900].
    #[arg(long, value_name = "SECONDS", requires = "check")]
    stalled_critical: Option<f64>,
    /// Replication lag before a warning [default: 1].
    #[arg(long, value_name = "SECONDS", requires = "check")]
    lag_warning: Option<f64>,
    /// ... before critical [default: 300].
    #[arg(long, value_name = "SECONDS", requires = "check")]
    lag_critical: Option<f64>,
    /// Facts waiting at a link's source before a warning [default: 10000].
    #[arg(long, value_name = "FACTS", requires = "check")]
    backlog_warning: Option<f64>,
    /// ... before critical [default: 1000000].
    #[arg(long, value_name = "FACTS", requires = "check")]
    backlog_critical: Option<f64>,
    /// Days left on a certificate below which it warns [default: 14].
    #[arg(long, value_name = "DAYS", requires = "check")]
    certificate_warning_days: Option<f64>,
    /// ... below which it is critical [default: 3].
    #[arg(long, value_name = "DAYS", requires = "check")]
    certificate_critical_days: Option<f64>,
}

impl CheckLimits {
    fn limits(&self) -> check::Limits {
        let mut l = check::Limits::default();
        let set = |t: &mut check::Threshold, w: Option<f64>, c: Option<f64>| {
            t.warning = w.or(t.warning);
            t.critical = c.or(t.critical);
        };
        set(&mut l.stalled, self.stalled_warning, self.stalled_critical);
        set(&mut l.lag, self.lag_warning, self.lag_critical);
        set(&mut l.backlog, self.backlog_warning, self.backlog_critical);
        set(
            &mut l.certificate_days,
            self.certificate_warning_days,
            self.certificate_critical_days,
        );
        l
    }
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// `2026-12-02T10:00:00Z  INFO link{zone=.. link=..}: message key=value`.
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, `message`, `zone`
    /// (every line of `run`), the event's fields, and `span` with the link's zone,
    /// link, consumer and peer or a request's peer.
    Json,
}

/// A JSON log line's writer: adds `"zone"` to every line that has none, so a line
/// logged by a task outside the zone's spans (a request, the store) still says which
/// zone wrote it. One writer per event; the line is written whole when it is dropped.
struct ZoneLine {
    zone: Option<Arc<str>>,
    line: Vec<u8>,
}

impl std::io::Write for ZoneLine {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.line.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for ZoneLine {
    fn drop(&mut self) {
        use std::io::Write as _;
        let line = std::mem::take(&mut self.line);
        let mut err = std::io::stderr().lock();
        if let Some(zone) = &self.zone
            && let Ok(mut fields) =
                serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&line)
            && !fields.contains_key("zone")
        {
            fields.insert("zone".into(), serde_json::Value::String(zone.to_string()));
            if serde_json::to_writer(&mut err, &fields).is_ok() {
                let _ = err.write_all(b"\n");
                return;
            }
        }
        let _ = err.write_all(&line);
    }
}

/// Starts logging to stderr; a bad `--log-level` is a usage error (exit 2). `zone`
/// (for `run`) is added to every JSON line that does not name one.
fn init_tracing(
    format: LogFormat,
    level: Option<&str>,
    zone: Option<&str>,
) -> Result<(), (u8, anyhow::Error)> {
    const DEFAULT: &str = "info,async_nats=warn,h2=warn,tower=warn";
    let filter = match level {
        Some(l) => {
            // A bare level keeps the noisy libraries at warn, as the default does.
            let directives = match l {
                "error" | "warn" | "info" | "debug" | "trace" => {
                    format!("{l},async_nats=warn,h2=warn,tower=warn")
                }
                other => other.to_owned(),
            };
            tracing_subscriber::EnvFilter::try_new(&directives).map_err(|e| {
                (
                    2u8,
                    anyhow::anyhow!("--log-level {l:?}: {e} (a level such as info or debug, or directives such as info,bsfg_core=debug)"),
                )
            })?
        }
        None => tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT)),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        // Colour codes only for a person at a terminal; log files stay greppable.
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
        LogFormat::Json => builder
            .with_writer({
                let zone: Option<Arc<str>> = zone.map(Arc::from);
                move || ZoneLine {
                    zone: zone.clone(),
                    line: Vec::with_capacity(256),
                }
            })
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
    Ok(())
}

async fn dispatch(cli: Cli) -> Result<(), (u8, anyhow::Error)> {
    let op = |e: anyhow::Error| (1u8, e);
    match cli.command {
        Command::Validate { config } => match config::load(&registry::builtin(), &config) {
            Ok(c) => {
                // Policies are loaded as at start-up: compiled, checked, initialised.
                let policies = policies::Policies::load(&c.policies).map_err(|e| (2u8, e))?;
                for (p, _) in &policies.all {
                    println!(
                        "{}: policy `{}` ok ({})",
                        config.display(),
                        p.config().name,
                        p.sha256()
                    );
                }
                // The zone's store, when it can be reached: what start-up would refuse.
                match c.sink.check(Duration::from_secs(2)).await {
                    Ok(line) => println!("{}: {line}", config.display()),
                    Err(e @ SinkError::Refused(_)) => {
                        return Err((2, anyhow::anyhow!("{}: {e}", config.display())));
                    }
                    Err(e) => println!(
                        "{}: note: the store was not checked ({e}); `bsfg run` checks that it can hold limits.max_fact_bytes",
                        config.display()
                    ),
                }
                println!(
                    "{}: ok: zone {}, sink {} at {}, {} consumer(s), {} listener(s)",
                    config.display(),
                    c.zone,
                    c.sink_type,
                    c.sink.location(),
                    c.sink.consumers().len(),
                    c.listeners.len()
                );
                Ok(())
            }
            Err(p) => Err((2, p.into())),
        },
        Command::Index {
            which: IndexCommand::Migrate { config },
        } => {
            let c = config::load(&registry::builtin(), &config).map_err(|p| (2u8, p.into()))?;
            let line = c
                .sink
                .upgrade()
                .await
                .map_err(|e| (1u8, anyhow::anyhow!("{}: {e}", config.display())))?;
            println!("{line}");
            Ok(())
        }
        Command::Run { config } => {
            let c = config::load(&registry::builtin(), &config).map_err(|p| (2u8, p.into()))?;
            init_tracing(cli.log_format, cli.log_level.as_deref(), Some(&c.zone))?;
            // A configuration the zone's store refuses (a max_fact_bytes its server
            // cannot hold, a stream that conflicts) is a configuration problem: 2.
            run::run(c).await.map_err(|e| {
                let config = e
                    .chain()
                    .any(|c| matches!(c.downcast_ref::<SinkError>(), Some(SinkError::Refused(_))));
                (if config { 2 } else { 1 }, e)
            })
        }
        Command::Append {
            fact,
            file,
            concurrency,
            batch,
            resume,
        } => {
            let api = client::connect(&cli.url, &cli.tls).map_err(|e| (2u8, e))?;
            let bulk = client::Bulk {
                concurrency,
                batch,
                resume,
            };
            client::append(api.as_ref(), &fact, file, bulk, cli.json)
                .await
                .map_err(op)
        }
        Command::Fetch {
            consumer,
            limit,
            wait,
            follow,
            confirm,
        } => {
            let api = client::connect(&cli.url, &cli.tls).map_err(|e| (2u8, e))?;
            let wait = if follow {
                wait.max(Duration::from_secs(5))
            } else {
                wait
            };
            client::fetch(
                api.as_ref(),
                &consumer,
                limit,
                wait,
                follow,
                confirm,
                cli.json,
            )
            .await
            .map_err(op)
        }
        Command::Confirm { consumer, offset } => {
            let api = client::connect(&cli.url, &cli.tls).map_err(|e| (2u8, e))?;
            client::confirm(api.as_ref(), &consumer, offset, cli.json)
                .await
                .map_err(op)
        }
        Command::Pull {
            source,
            consumer,
            limit,
            follow,
            accept_gap,
            zone,
            source_zone,
            accepted_by,
        } => {
            let dest = client::connect(&cli.url, &cli.tls).map_err(|e| (2u8, e))?;
            let src = client::connect(&source, &cli.tls).map_err(|e| (2u8, e))?;
            let acceptance = match (accept_gap, zone) {
                (true, Some(local_zone)) => Some(bsfg_core::link::GapAcceptance {
                    local_zone,
                    accepted_by,
                    at_unix_ms: client::now_ms(),
                    range: None,
                }),
                _ => None,
            };
            client::pull(
                src.as_ref(),
                dest.as_ref(),
                client::PullArgs {
                    source_zone: &source_zone,
                    consumer: &consumer,
                    limit,
                    follow,
                },
                acceptance,
                cli.json,
            )
            .await
            .map_err(op)
        }
        Command::Status {
            admin,
            check,
            limits,
        } => {
            let endpoint = admin.endpoint().map_err(|e| (2u8, e))?;
            if check {
                let level = client::check(&endpoint, limits.limits(), cli.json).await;
                use std::io::Write as _;
                let _ = std::io::stdout().flush();
                std::process::exit(level as i32);
            }
            client::status(&endpoint, cli.json).await.map_err(op)
        }
        Command::Link {
            which:
                LinkCommand::AcceptGap {
                    admin,
                    link,
                    from,
                    to,
                    by,
                },
        } => {
            let endpoint = admin.endpoint().map_err(|e| (2u8, e))?;
            client::accept_gap(&endpoint, &link, from, to, &by)
                .await
                .map_err(op)
        }
        Command::Policy {
            which: PolicyCommand::Test(t),
        } => {
            init_tracing(cli.log_format, cli.log_level.as_deref(), None)?;
            client::policy_test(t, cli.json).map_err(op)
        }
        Command::Quarantine { which } => {
            let (admin, q) = match which {
                QuarantineCommand::List { admin, limit } => {
                    (admin, client::QuarantineOp::List { limit })
                }
                QuarantineCommand::Show { admin, id, payload } => {
                    (admin, client::QuarantineOp::Show { id, payload })
                }
                QuarantineCommand::Release {
                    admin,
                    id,
                    payload,
                    by,
                } => (admin, client::QuarantineOp::Release { id, payload, by }),
                QuarantineCommand::Drop {
                    admin,
                    id,
                    payload,
                    by,
                } => (admin, client::QuarantineOp::Drop { id, payload, by }),
            };
            let endpoint = admin.endpoint().map_err(|e| (2u8, e))?;
            client::quarantine(&endpoint, q, cli.json).await.map_err(op)
        }
        Command::Certs { which } => {
            let written = match &which {
                CertsCommand::Init(o) => certs::init(o),
                CertsCommand::Issue(o) => certs::issue(o),
                CertsCommand::AdminToken(o) => certs::admin_token(o),
            }
            .map_err(op)?;
            for p in written {
                println!("wrote {}", p.display());
            }
            Ok(())
        }
        #[cfg(feature = "bench")]
        Command::Bench { which } => bench::run(which).await.map_err(op),
        Command::PutObject { bucket, key, file } => {
            let api = client::connect(&cli.url, &cli.tls).map_err(|e| (2u8, e))?;
            client::put_object(api.as_ref(), &bucket, key, file, cli.json)
                .await
                .map_err(op)
        }
        Command::GetObject {
            bucket,
            key,
            head,
            resume,
            out,
        } => {
            let api = client::connect(&cli.url, &cli.tls).map_err(|e| (2u8, e))?;
            let target = if head { None } else { out.map(|o| (o, resume)) };
            client::get_object(api.as_ref(), &bucket, &key, target, cli.json)
                .await
                .map_err(op)
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err((code, e)) => {
            eprintln!("bsfg: {e:#}");
            // Exit now: a gateway whose stop timed out may have tasks still blocked on
            // an unreachable store, which dropping the runtime would wait for.
            use std::io::Write as _;
            let _ = std::io::stdout().flush();
            std::process::exit(i32::from(code))
        }
    }
}
