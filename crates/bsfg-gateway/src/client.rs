//! Client commands against a running gateway: append, fetch, confirm, put-object.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use bsfg_core::{BoundaryApi, BoundaryError, Envelope, Fact, FactPage, FetchRequest, Message};

use bsfg_core::component::{Security, TlsMaterial};
use futures::{StreamExt, TryStreamExt};

/// The client's certificate for `grpcs://` URLs.
#[derive(Debug, Clone, clap::Args)]
pub struct TlsArgs {
    /// Client certificate (PEM) for grpcs:// URLs.
    #[arg(long, global = true, env = "BSFG_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// Client private key (PEM) for grpcs:// URLs.
    #[arg(long, global = true, env = "BSFG_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// CA certificate (PEM) the gateway's certificate must chain to.
    #[arg(long, global = true, env = "BSFG_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Name the gateway's certificate must carry (default: the URL's host).
    #[arg(long, global = true, env = "BSFG_TLS_SERVER_NAME")]
    pub tls_server_name: Option<String>,
}

/// A client for `url`, by its scheme's registered transport; a mutual-TLS scheme
/// with the certificate from `--tls-cert/--tls-key/--tls-ca`. The connection is made
/// on first use.
pub fn connect(url: &str, tls: &TlsArgs) -> anyhow::Result<Arc<dyn BoundaryApi>> {
    let registry = crate::registry::builtin();
    let (_, scheme, _) = registry.endpoint(url).map_err(|e| anyhow::anyhow!("{e}"))?;
    let material = match scheme.security {
        Security::MutualTls { alpn } => {
            let (Some(cert), Some(key), Some(ca)) = (&tls.tls_cert, &tls.tls_key, &tls.tls_ca)
            else {
                bail!(
                    "{url}: mutual TLS needs --tls-cert, --tls-key and --tls-ca (or BSFG_TLS_CERT, BSFG_TLS_KEY, BSFG_TLS_CA)"
                );
            };
            let files = bsfg_tls::TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                trust: vec![bsfg_tls::Anchor {
                    name: "ca".into(),
                    path: ca.clone(),
                }],
                identity_from: bsfg_tls::IdentityFrom::San,
            };
            let client =
                bsfg_tls::ClientTls::new(files, vec![alpn.to_vec()], "cli", Arc::default())?;
            Some((TlsMaterial::new(client), tls.tls_server_name.clone()))
        }
        Security::Plaintext | Security::LocalCredentials { .. } => None,
    };
    registry
        .dial(url, material)
        .map_err(|e| anyhow::anyhow!("{e}"))
}

/// The fields of one fact given on the command line.
#[derive(Debug, clap::Args)]
pub struct FactArgs {
    /// Idempotency key, derived from the business event.
    #[arg(long)]
    pub message_id: Option<String>,
    /// Producing zone.
    #[arg(long = "from")]
    pub from_zone: Option<String>,
    /// Destination zone.
    #[arg(long = "to")]
    pub to_zone: Option<String>,
    /// `kind:id` or `kind:scope/id`.
    #[arg(long)]
    pub subject: Option<String>,
    /// lower_snake_case relation.
    #[arg(long)]
    pub predicate: Option<String>,
    /// The object as JSON text.
    #[arg(long = "object", default_value = "{}")]
    pub object_json: String,
    /// A label `key=value` (repeatable).
    #[arg(long = "label", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// An artifact the fact references, `BUCKET/KEY` (repeatable): its digest and
    /// size are read from the zone appended to, which must hold it (put-object first).
    #[arg(long = "artifact")]
    pub artifacts: Vec<String>,
    /// MIME type of the referenced artifacts (required with --artifact).
    #[arg(long)]
    pub media_type: Option<String>,
    /// Workflow grouping.
    #[arg(long)]
    pub correlation_id: Option<String>,
    /// message_id of the cause.
    #[arg(long)]
    pub causation_id: Option<String>,
    /// Producer time in Unix ms (default: now).
    #[arg(long)]
    pub produced_at_unix_ms: Option<i64>,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("`{s}` is not key=value"))
}

/// Unix time in milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl FactArgs {
    fn message(&self) -> anyhow::Result<Message> {
        let need = |v: &Option<String>, flag: &str| {
            v.clone()
                .with_context(|| format!("--{flag} is required (or use --file)"))
        };
        Ok(Message {
            envelope: Envelope {
                message_id: need(&self.message_id, "message-id")?,
                from_zone: need(&self.from_zone, "from")?,
                to_zone: need(&self.to_zone, "to")?,
                produced_at_unix_ms: self.produced_at_unix_ms.unwrap_or_else(now_ms),
                correlation_id: self.correlation_id.clone(),
                causation_id: self.causation_id.clone(),
                labels: self.labels.iter().cloned().collect(),
                object_media_type: self.media_type.clone(),
                ..Default::default()
            },
            fact: Fact {
                subject: need(&self.subject, "subject")?,
                predicate: need(&self.predicate, "predicate")?,
                object_json: self.object_json.clone(),
                artifacts: vec![],
            },
        })
    }
}

fn print_outcome(json: bool, id: &str, out: &bsfg_core::AppendOutcome) {
    if json {
        println!(
            "{}",
            serde_json::json!({"message_id": id, "stream": out.stream, "offset": out.offset, "duplicate": out.duplicate})
        );
    } else if out.duplicate {
        println!(
            "duplicate {id} -> {}:{} (already stored, nothing new)",
            out.stream, out.offset
        );
    } else {
        println!("appended  {id} -> {}:{}", out.stream, out.offset);
    }
}

/// JSON lines from a file or `-` (stdin), with the file's size when known.
fn open_lines(file: &std::path::Path) -> anyhow::Result<(Box<dyn BufRead>, Option<u64>)> {
    if file.as_os_str() == "-" {
        return Ok((Box::new(std::io::stdin().lock()), None));
    }
    let f = std::fs::File::open(file).with_context(|| format!("cannot open {}", file.display()))?;
    let len = f.metadata().map(|m| m.len()).ok();
    Ok((Box::new(std::io::BufReader::new(f)), len))
}

/// Line `i` (0-based) of a JSON-lines input: a message, or `None` for a blank line.
fn message_line(i: usize, line: &str) -> anyhow::Result<Option<Message>> {
    if line.trim().is_empty() {
        return Ok(None);
    }
    serde_json::from_str(line).map(Some).with_context(|| {
        format!(
            "line {}: not a message ({{\"envelope\": {{...}}, \"fact\": {{...}}}})",
            i + 1
        )
    })
}

/// How `bsfg append --file` sends its lines.
#[derive(Debug, Clone, Copy)]
pub struct Bulk {
    /// Facts in flight at once (several AppendFacts calls when larger than `batch`).
    pub concurrency: usize,
    /// Facts per AppendFacts call.
    pub batch: usize,
    /// Skip the lines an earlier run had acknowledged (read from the progress file).
    pub resume: bool,
}

/// The progress file of an input file: the last line of the acknowledged prefix.
pub fn progress_path(file: &std::path::Path) -> Option<PathBuf> {
    if file.as_os_str() == "-" {
        return None;
    }
    let mut name = file.file_name()?.to_os_string();
    name.push(".bsfg-acked");
    Some(file.with_file_name(name))
}

/// Records that every line up to `line` (1-based) is acknowledged (written to a
/// temporary file, then renamed, so a crash leaves the old or the new number).
fn record_progress(path: &std::path::Path, line: usize) -> anyhow::Result<()> {
    let tmp = path.with_extension("bsfg-acked.tmp");
    std::fs::write(&tmp, format!("{line}\n"))
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// The acknowledged prefix an earlier run recorded (0: none).
fn read_progress(path: &std::path::Path) -> anyhow::Result<usize> {
    match std::fs::read_to_string(path) {
        Ok(s) => s
            .trim()
            .parse()
            .with_context(|| format!("{} holds no line number", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// `bsfg append`: one fact from flags, or JSON lines from a file or `-` (stdin),
/// sent in AppendFacts calls of `bulk.batch` facts with several calls in flight.
/// Answers are printed in input order; the first refused fact stops the run with
/// its line number. After every call the last line of the acknowledged prefix is
/// recorded beside the file (`<file>.bsfg-acked`), so `--resume` skips what was
/// acknowledged.
pub async fn append(
    api: &dyn BoundaryApi,
    args: &FactArgs,
    file: Option<PathBuf>,
    bulk: Bulk,
    json: bool,
) -> anyhow::Result<()> {
    let Some(file) = file else {
        let mut m = args.message()?;
        for a in &args.artifacts {
            let (bucket, key) = a
                .split_once('/')
                .with_context(|| format!("--artifact `{a}` is not BUCKET/KEY"))?;
            let info = api.head_object(bucket, key).await.map_err(op_error)?;
            m.fact.artifacts.push(bsfg_core::model::ArtifactRef {
                bucket: info.bucket,
                key: info.key,
                digest: info.digest,
                size: info.size,
            });
        }
        let id = m.envelope.message_id.clone();
        let out = api.append_fact(m).await.map_err(op_error)?;
        print_outcome(json, &id, &out);
        return Ok(());
    };
    let progress = progress_path(&file);
    let skip = match (&progress, bulk.resume) {
        (Some(p), true) => read_progress(p)?,
        (None, true) => anyhow::bail!("--resume needs a file (stdin has no progress)"),
        (_, false) => 0,
    };
    let (reader, total) = open_lines(&file)?;
    let bar = match total {
        Some(len) if !json => indicatif::ProgressBar::with_draw_target(
            Some(len),
            indicatif::ProgressDrawTarget::stderr(),
        ),
        _ => indicatif::ProgressBar::hidden(),
    };
    let batch = bulk.batch.clamp(1, bsfg_core::MAX_APPEND_FACTS);
    let in_flight = bulk.concurrency.div_ceil(batch).max(1);
    // Lines in chunks of `batch` messages: (line number, message) with the chunk's
    // last line number (blank and skipped lines count toward it).
    let mut lines = reader.lines().enumerate();
    let reading = bar.clone();
    let chunks = futures::stream::poll_fn(move |_| {
        let mut chunk: Vec<(usize, Message)> = Vec::with_capacity(batch);
        let mut last = 0usize;
        for (i, line) in lines.by_ref() {
            last = i + 1;
            let line = match line.context("reading input") {
                Ok(l) => l,
                Err(e) => return std::task::Poll::Ready(Some(Err(e))),
            };
            reading.inc(line.len() as u64 + 1);
            if i < skip {
                continue;
            }
            match message_line(i, &line) {
                Ok(Some(m)) => chunk.push((i + 1, m)),
                Ok(None) => {}
                Err(e) => return std::task::Poll::Ready(Some(Err(e))),
            }
            if chunk.len() >= batch {
                break;
            }
        }
        if chunk.is_empty() && last == 0 {
            return std::task::Poll::Ready(None);
        }
        std::task::Poll::Ready(Some(Ok((chunk, last))))
    });
    let answers = chunks
        .map(|c| async move {
            let (chunk, last) = c?;
            let (numbers, messages): (Vec<usize>, Vec<Message>) = chunk.into_iter().unzip();
            let ids: Vec<String> = messages
                .iter()
                .map(|m| m.envelope.message_id.clone())
                .collect();
            let first = numbers.first().copied().unwrap_or(last);
            let results = if messages.is_empty() {
                Vec::new()
            } else {
                api.append_facts(messages)
                    .await
                    .map_err(|e| anyhow::anyhow!("lines {first}..={last}: {e}"))?
            };
            anyhow::Ok((numbers, ids, results, last))
        })
        .buffered(in_flight);
    futures::pin_mut!(answers);
    let (mut stored, mut dups) = (0u64, 0u64);
    let mut failure = None;
    while let Some(r) = answers.next().await {
        let (numbers, ids, results, last) = match r {
            Ok(a) => a,
            Err(e) => {
                failure = Some(e);
                break;
            }
        };
        for ((n, id), out) in numbers.into_iter().zip(ids).zip(results) {
            match out {
                Ok(out) => {
                    if out.duplicate {
                        dups += 1;
                    } else {
                        stored += 1;
                    }
                    bar.suspend(|| print_outcome(json, &id, &out));
                }
                Err(e) => {
                    failure = Some(anyhow::anyhow!("line {n}: {e}"));
                    if let Some(p) = &progress {
                        record_progress(p, n - 1)?;
                    }
                    break;
                }
            }
        }
        if failure.is_some() {
            break;
        }
        if let Some(p) = &progress {
            record_progress(p, last)?;
        }
    }
    bar.finish_and_clear();
    if !json {
        eprintln!(
            "{stored} stored, {dups} duplicate(s){}",
            if skip > 0 {
                format!(" (lines 1..={skip} acknowledged before, skipped)")
            } else {
                String::new()
            }
        );
    }
    match failure {
        Some(e) => Err(e.context(match &progress {
            Some(p) => format!(
                "stopped; what was acknowledged is recorded in {}: run again with --resume to go on after it",
                p.display()
            ),
            None => "stopped".to_owned(),
        })),
        None => Ok(()),
    }
}

fn op_error(e: BoundaryError) -> anyhow::Error {
    anyhow::anyhow!("{e}")
}

fn print_page(json: bool, page: &FactPage) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        let facts: Vec<_> = page
            .facts
            .iter()
            .map(|f| serde_json::json!({"offset": f.offset, "appended_at_unix_ms": f.appended_at_unix_ms, "delivery_count": f.delivery_count, "message": f.message, "provenance": f.provenance}))
            .collect();
        writeln!(
            out,
            "{}",
            serde_json::json!({"zone": page.zone, "stream": page.stream, "first_offset": page.first_offset, "last_offset": page.last_offset, "frontier": page.frontier, "pending": page.pending, "facts": facts})
        )?;
    } else {
        for f in &page.facts {
            let m = &f.message;
            writeln!(
                out,
                "{}:{}  {} {} {}  id={}{}{}",
                page.stream,
                f.offset,
                m.fact.subject,
                m.fact.predicate,
                m.fact.object_json,
                m.envelope.message_id,
                f.provenance.as_ref().map_or(String::new(), |p| format!(
                    "  via {}:{}:{}",
                    p.zone, p.stream, p.offset
                )),
                if f.delivery_count > 1 {
                    format!(" (delivery {})", f.delivery_count)
                } else {
                    String::new()
                }
            )?;
        }
        writeln!(
            out,
            "# {} fact(s); stream {} holds {}..{}; frontier {}; {} not yet confirmed",
            page.facts.len(),
            page.stream,
            page.first_offset,
            page.last_offset,
            page.frontier,
            page.pending
        )?;
    }
    Ok(())
}

/// `bsfg fetch`: prints a page (or keeps fetching with `follow`); with `confirm`, each
/// page is confirmed once printed.
pub async fn fetch(
    api: &dyn BoundaryApi,
    consumer: &str,
    limit: u32,
    wait: Duration,
    follow: bool,
    confirm: bool,
    json: bool,
) -> anyhow::Result<()> {
    loop {
        let page = api
            .fetch_facts(FetchRequest {
                consumer: consumer.to_owned(),
                limit,
                wait,
            })
            .await
            .map_err(op_error)?;
        print_page(json, &page)?;
        if confirm && let Some(last) = page.facts.last() {
            let f = api
                .confirm_receipt(consumer, last.offset)
                .await
                .map_err(op_error)?;
            if !json {
                println!("# confirmed up to {}; frontier {}", last.offset, f.offset);
            }
        }
        if !follow {
            return Ok(());
        }
    }
}

/// `bsfg confirm`.
pub async fn confirm(
    api: &dyn BoundaryApi,
    consumer: &str,
    offset: u64,
    json: bool,
) -> anyhow::Result<()> {
    let f = api
        .confirm_receipt(consumer, offset)
        .await
        .map_err(op_error)?;
    if json {
        println!(
            "{}",
            serde_json::json!({"consumer": consumer, "frontier": f.offset})
        );
    } else {
        println!("consumer {consumer}: frontier {}", f.offset);
    }
    Ok(())
}

/// `bsfg put-object`: streams a file with a progress bar.
pub async fn put_object(
    api: &dyn BoundaryApi,
    bucket: &str,
    key: Option<String>,
    file: PathBuf,
    json: bool,
) -> anyhow::Result<()> {
    let key = match key {
        Some(k) => k,
        None => match file.file_name().and_then(|n| n.to_str()) {
            Some(n) => n.to_owned(),
            None => bail!(
                "--key is required: {} has no usable file name",
                file.display()
            ),
        },
    };
    let f = tokio::fs::File::open(&file)
        .await
        .with_context(|| format!("cannot open {}", file.display()))?;
    let len = f.metadata().await.map(|m| m.len()).unwrap_or(0);
    let bar = if json {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::with_draw_target(Some(len), indicatif::ProgressDrawTarget::stderr())
    };
    let progress = bar.clone();
    let body = tokio_util::io::ReaderStream::with_capacity(f, 256 * 1024)
        .inspect_ok(move |b| progress.inc(b.len() as u64))
        .map_err(|e| BoundaryError::Unavailable(format!("reading the file: {e}")))
        .boxed();
    let info = api.put_object(bucket, &key, body).await.map_err(op_error)?;
    bar.finish_and_clear();
    if json {
        println!(
            "{}",
            serde_json::json!({"bucket": info.bucket, "key": info.key, "digest": info.digest, "size": info.size})
        );
    } else {
        println!(
            "stored {}/{} {} ({} bytes)",
            info.bucket, info.key, info.digest, info.size
        );
    }
    Ok(())
}

/// `bsfg get-object`: the artifact's info, or its bytes into `target` (file, resume)
/// with a progress bar; what the file holds in the end is hashed and must have the
/// zone's digest (a mismatch is an error, and the file is left for inspection).
pub async fn get_object(
    api: &dyn BoundaryApi,
    bucket: &str,
    key: &str,
    target: Option<(PathBuf, bool)>,
    json: bool,
) -> anyhow::Result<()> {
    use sha2::Digest as _;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let print = |info: &bsfg_core::ObjectInfo, path: Option<&std::path::Path>| {
        if json {
            println!(
                "{}",
                serde_json::json!({"bucket": info.bucket, "key": info.key, "digest": info.digest, "size": info.size, "file": path.map(|p| p.display().to_string())})
            );
        } else {
            match path {
                Some(p) => println!(
                    "fetched {}/{} {} ({} bytes) into {}",
                    info.bucket,
                    info.key,
                    info.digest,
                    info.size,
                    p.display()
                ),
                None => println!(
                    "{}/{} {} ({} bytes)",
                    info.bucket, info.key, info.digest, info.size
                ),
            }
        }
    };
    let Some((path, resume)) = target else {
        let info = api.head_object(bucket, key).await.map_err(op_error)?;
        print(&info, None);
        return Ok(());
    };
    // What the file holds already is hashed first, so the digest covers it all.
    let mut hasher = sha2::Sha256::new();
    let mut offset = 0u64;
    if resume && let Ok(mut f) = tokio::fs::File::open(&path).await {
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = f
                .read(&mut buf)
                .await
                .with_context(|| format!("reading {}", path.display()))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            offset += n as u64;
        }
    }
    let read = api
        .get_object(bucket, key, offset)
        .await
        .map_err(op_error)?;
    let mut file = tokio::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(resume)
        .truncate(!resume)
        .open(&path)
        .await
        .with_context(|| format!("cannot write {}", path.display()))?;
    let bar = if json {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::with_draw_target(
            Some(read.info.size),
            indicatif::ProgressDrawTarget::stderr(),
        )
    };
    bar.set_position(offset);
    let mut body = read.body;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(op_error)?;
        hasher.update(&chunk);
        file.write_all(&chunk)
            .await
            .with_context(|| format!("writing {}", path.display()))?;
        bar.inc(chunk.len() as u64);
    }
    file.flush().await?;
    file.sync_all().await?;
    bar.finish_and_clear();
    let got = format!("sha256:{}", hex::encode(hasher.finalize()));
    anyhow::ensure!(
        got == read.info.digest,
        "{} holds {got}, but the zone's {bucket}/{key} is {}; the file is left as it is",
        path.display(),
        read.info.digest
    );
    print(&read.info, Some(&path));
    Ok(())
}

/// What `bsfg pull` pulls.
pub struct PullArgs<'a> {
    /// The source zone's name (for the report; a remote destination keeps no
    /// provenance).
    pub source_zone: &'a str,
    /// The consumer on the source.
    pub consumer: &'a str,
    /// Page size.
    pub limit: u32,
    /// Keep pulling until interrupted.
    pub follow: bool,
}

/// `bsfg pull`: the receiver-driven step of `bsfg_core::link`, repeated. A gap stops
/// it with an error unless `accept_gap` is given, which records the gap as a fact in
/// the destination zone and passes over it.
pub async fn pull(
    source: &dyn BoundaryApi,
    destination: &dyn BoundaryApi,
    step: PullArgs<'_>,
    accept_gap: Option<bsfg_core::link::GapAcceptance>,
    json: bool,
) -> anyhow::Result<()> {
    let follow = step.follow;
    let consumer = step.consumer;
    let wait = if follow {
        Duration::from_secs(5)
    } else {
        Duration::from_millis(200)
    };
    let step = bsfg_core::link::PullStep {
        link: format!("cli-{consumer}"),
        consumer: consumer.to_owned(),
        limit: step.limit,
        wait,
        streams: vec![],
        source_zone: step.source_zone.to_owned(),
        // The destination is reached through its API; `bsfg pull` runs no intake
        // policies, so it never writes a filter record in this name.
        local_zone: "local".into(),
    };
    let destination = bsfg_core::link::Remote(destination);
    loop {
        let r = bsfg_core::link::pull_page(source, &destination, &step, accept_gap.as_ref())
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        if json {
            println!(
                "{}",
                serde_json::json!({"fetched": r.fetched, "stored": r.stored, "duplicates": r.duplicates, "frontier": r.frontier, "last_offset": r.last_offset})
            );
        } else if r.fetched > 0 || !follow {
            println!(
                "pulled {} fact(s): {} stored, {} already present; source frontier {} of {}",
                r.fetched, r.stored, r.duplicates, r.frontier, r.last_offset
            );
        }
        if r.fetched == 0 && !follow {
            return Ok(());
        }
    }
}

/// A zone's admin endpoint and the token its state-changing calls need.
#[derive(Debug, Clone)]
pub struct AdminEndpoint {
    /// `host:port`.
    pub addr: String,
    /// The admin token, sent with state-changing calls only.
    pub token: Option<String>,
}

/// One HTTP/1.1 request to a zone's admin endpoint; returns status and body.
async fn admin_request(
    endpoint: &AdminEndpoint,
    method: &str,
    path: &str,
) -> anyhow::Result<(u16, String)> {
    let addr = endpoint.addr.as_str();
    use http_body_util::BodyExt as _;
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| anyhow::anyhow!("admin endpoint {addr}: {e}"))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| anyhow::anyhow!("admin endpoint {addr}: {e}"))?;
    tokio::spawn(conn);
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, addr);
    if let Some(token) = endpoint.token.as_ref().filter(|_| method != "GET") {
        req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let req = req.body(http_body_util::Empty::<bytes::Bytes>::new())?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| anyhow::anyhow!("admin endpoint {addr}: {e}"))?;
    let code = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| anyhow::anyhow!("admin endpoint {addr}: {e}"))?
        .to_bytes();
    Ok((code, String::from_utf8_lossy(&body).into_owned()))
}

fn ago(unix_ms: Option<i64>) -> String {
    match unix_ms {
        None => "never".into(),
        Some(t) => {
            let d = Duration::from_millis((now_ms() - t).max(0) as u64);
            format!(
                "{} ago",
                humantime::format_duration(Duration::from_secs(d.as_secs()))
            )
        }
    }
}

/// `bsfg status`: every link of the zone with its state, lag and last success.
pub async fn status(endpoint: &AdminEndpoint, json: bool) -> anyhow::Result<()> {
    let (code, body) = admin_request(endpoint, "GET", "/status").await?;
    anyhow::ensure!(
        code == 200,
        "admin endpoint {} answered {code}: {body}",
        endpoint.addr
    );
    if json {
        println!("{}", body.trim());
        return Ok(());
    }
    let s: crate::admin::ZoneStatus = serde_json::from_str(&body)?;
    println!("zone {}: {} link(s)", s.zone, s.links.len());
    for l in &s.links {
        use bsfg_core::link::LinkState;
        let detail = match &l.state {
            LinkState::Gapped {
                missing_from: f,
                missing_to: t,
            } => format!(
                " at offsets {f}..={t} (accept with: bsfg link accept-gap --link {} --from {f} --to {t})",
                l.name
            ),
            LinkState::BackingOff {
                attempt,
                retry_in_ms,
                op,
                error,
            } => format!(" (attempt {attempt}, retry in {retry_in_ms} ms; {op} failed: {error})"),
            _ => String::new(),
        };
        let detail = match (&l.state, &l.holder) {
            (LinkState::Standby, Some(h)) => format!(" (runs on {h})"),
            (_, Some(h)) => format!("{detail} (held by {h})"),
            _ => detail,
        };
        println!(
            "  {} <- {}/{}: {}{detail}; frontier {} of {}, lag {} fact(s) / {:.3} s, last success {}",
            l.name,
            l.source_zone,
            l.consumer,
            l.state.name(),
            l.frontier,
            l.source_last_offset,
            l.lag_facts,
            l.lag_seconds,
            ago(l.last_success_unix_ms),
        );
        if l.artifacts_copied + l.artifacts_present + l.artifacts_pending + l.artifacts_unavailable
            > 0
        {
            println!(
                "    artifacts: {} pending, {} copied ({} bytes), {} present already, {} unavailable (quarantined), {} failed copies",
                l.artifacts_pending,
                l.artifacts_copied,
                l.artifact_bytes,
                l.artifacts_present,
                l.artifacts_unavailable,
                l.artifact_failures
            );
        }
    }
    Ok(())
}

/// `bsfg status --check`: judges the zone against the runbook's thresholds
/// ([`crate::check`]), prints one summary line and each finding, and returns the
/// level (its number is the exit code). An endpoint that does not answer is critical.
pub async fn check(
    endpoint: &AdminEndpoint,
    limits: crate::check::Limits,
    json: bool,
) -> crate::check::Level {
    use crate::check::{Finding, Level};
    match observe(endpoint, limits).await {
        Ok(o) => {
            let findings = crate::check::judge(&o);
            let level = crate::check::worst(&findings);
            if json {
                let items: Vec<serde_json::Value> = findings
                    .iter()
                    .map(|f| serde_json::json!({"level": f.level.word(), "alert": f.alert, "text": f.text}))
                    .collect();
                println!(
                    "{}",
                    serde_json::json!({"zone": o.zone, "level": level.word(), "exit_code": level as i32, "findings": items})
                );
            } else {
                print!("{}", crate::check::report(&o, &findings));
            }
            level
        }
        Err(e) => {
            let msg = format!("{e:#}");
            let f = Finding {
                level: Level::Critical,
                alert: crate::check::GATEWAY_DOWN.alert,
                text: if msg.contains(&endpoint.addr) {
                    msg
                } else {
                    format!("admin endpoint {}: {msg}", endpoint.addr)
                },
            };
            if json {
                println!(
                    "{}",
                    serde_json::json!({"level": "CRITICAL", "exit_code": 2, "findings": [{"level": "CRITICAL", "alert": f.alert, "text": f.text}]})
                );
            } else {
                println!("BSFG CRITICAL - {}\n{f}", f.text);
            }
            Level::Critical
        }
    }
}

async fn observe(
    endpoint: &AdminEndpoint,
    limits: crate::check::Limits,
) -> anyhow::Result<crate::check::Observed> {
    let get = |path: &'static str| admin_request(endpoint, "GET", path);
    let (ready, _) = get("/readyz").await?;
    let (code, body) = get("/status").await?;
    anyhow::ensure!(code == 200, "/status answered {code}: {body}");
    let status: crate::admin::ZoneStatus = serde_json::from_str(&body)?;
    let (code, metrics) = get("/metrics").await?;
    anyhow::ensure!(code == 200, "/metrics answered {code}: {metrics}");
    let (code, body) = get("/quarantine?limit=1000").await?;
    anyhow::ensure!(code == 200, "/quarantine answered {code}: {body}");
    let quarantined = serde_json::from_str::<Vec<serde_json::Value>>(&body)?.len();
    let now_unix_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    Ok(crate::check::Observed {
        zone: status.zone,
        ready: ready == 200,
        links: status.links,
        quarantined,
        metrics,
        now_unix_s,
        limits,
    })
}

/// `bsfg link accept-gap`: asks the zone to pass its link over exactly this gap.
pub async fn accept_gap(
    endpoint: &AdminEndpoint,
    link: &str,
    from: u64,
    to: u64,
    by: &str,
) -> anyhow::Result<()> {
    let query = serde_urlencoded::to_string([
        ("from", from.to_string()),
        ("to", to.to_string()),
        ("by", by.to_owned()),
    ])?;
    let (code, body) = admin_request(
        endpoint,
        "POST",
        &format!("/links/{link}/accept-gap?{query}"),
    )
    .await?;
    anyhow::ensure!(code == 200, "{}", body.trim());
    print!("{body}");
    Ok(())
}

/// `bsfg policy test` options.
#[derive(Debug, clap::Args)]
pub struct PolicyTest {
    /// The policy component (`.wasm`, or component text `.wat`).
    #[arg(long)]
    pub module: PathBuf,
    /// JSON lines, one `{"envelope": {...}, "fact": {...}}` per line (`-` for stdin).
    #[arg(long)]
    pub facts: PathBuf,
    /// A setting passed to `init`, as KEY=VALUE (repeatable).
    #[arg(long = "set", value_parser = parse_setting)]
    pub settings: Vec<(String, String)>,
    /// The hook the facts are decided at.
    #[arg(long, default_value = "append", value_parser = ["append", "intake"])]
    pub hook: String,
    /// The deciding zone, as the context tells the policy.
    #[arg(long, default_value = "test-zone")]
    pub zone: String,
    /// The peer identity, as the context tells the policy.
    #[arg(long, default_value = "local")]
    pub peer: String,
    /// Facts per batch (one `decide` call each).
    #[arg(long, default_value_t = 100)]
    pub batch: usize,
    /// Wall time one call may take.
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Linear memory one instance may use, in MiB.
    #[arg(long, default_value_t = 16)]
    pub memory_mib: usize,
    /// Instructions one call may execute (none: unmetered).
    #[arg(long)]
    pub fuel: Option<u64>,
}

fn parse_setting(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_owned(), v.to_owned()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("`{s}` is not KEY=VALUE"))
}

/// `bsfg policy test`: loads the module with the gateway's checks and limits, then
/// prints one verdict per fact (`allow <id>` / `deny <id>: <reason>`).
pub fn policy_test(t: PolicyTest, json: bool) -> anyhow::Result<()> {
    use bsfg_core::{Candidate, Hook, PolicyContext, Verdict};
    let mut cfg = bsfg_policy_wasm::PolicyConfig::new("test", &t.module);
    cfg.settings = t.settings.into_iter().collect();
    cfg.timeout = t.timeout;
    cfg.memory_bytes = t.memory_mib.max(1) << 20;
    cfg.fuel = t.fuel;
    cfg.instances = 1;
    let policy = bsfg_policy_wasm::WasmPolicy::load(cfg)?;
    eprintln!("loaded {} ({})", t.module.display(), policy.sha256());
    let (reader, _) = open_lines(&t.facts)?;
    let mut messages = Vec::new();
    for (i, line) in reader.lines().enumerate() {
        let line = line.context("reading input")?;
        if let Some(m) = message_line(i, &line).with_context(|| t.facts.display().to_string())? {
            messages.push(m);
        }
    }
    let hook = if t.hook == "intake" {
        Hook::Intake
    } else {
        Hook::Append
    };
    let ctx = PolicyContext {
        hook,
        zone: &t.zone,
        peer: &t.peer,
        link: (hook == Hook::Intake).then_some("test-link"),
        source_zone: (hook == Hook::Intake).then_some("test-source"),
    };
    let (mut allowed, mut denied, mut filtered, mut refused) = (0, 0, 0, 0);
    let limits = bsfg_core::Limits::default();
    for batch in messages.chunks(t.batch.max(1)) {
        // The gateway validates before any policy sees a fact: the same here, so the
        // policy judges the canonical form and a fact the zone would refuse says so.
        let checked: Vec<Result<Message, bsfg_core::BoundaryError>> = batch
            .iter()
            .map(|m| limits.validate(m.clone()).map(|v| v.into_message()))
            .collect();
        let valid: Vec<&Message> = checked.iter().filter_map(|c| c.as_ref().ok()).collect();
        let candidates: Vec<_> = valid
            .iter()
            .enumerate()
            .map(|(i, m)| Candidate {
                message: m,
                source_offset: (hook == Hook::Intake).then_some(i as u64 + 1),
            })
            .collect();
        let mut verdicts = policy.decide_blocking(&ctx, &candidates).into_iter();
        for (m, c) in batch.iter().zip(&checked) {
            let id = &m.envelope.message_id;
            let v = match c {
                Err(e) => {
                    refused += 1;
                    if json {
                        println!(
                            "{}",
                            serde_json::json!({"message_id": id, "verdict": "refused", "reason": e.reason().as_str(), "field": e.field(), "error": e.to_string()})
                        );
                    } else {
                        println!("refused {id}: {e}");
                    }
                    continue;
                }
                // Fail closed if the policy answered fewer verdicts than facts.
                Ok(_) => verdicts.next().unwrap_or_else(|| {
                    Verdict::Deny(bsfg_core::Denial {
                        policy: "test".into(),
                        reason: "policy_fault: no verdict".into(),
                        module_sha256: String::new(),
                    })
                }),
            };
            match v {
                Verdict::Allow => {
                    allowed += 1;
                    if json {
                        println!(
                            "{}",
                            serde_json::json!({"message_id": id, "verdict": "allow"})
                        );
                    } else {
                        println!("allow {id}");
                    }
                }
                Verdict::Deny(d) => {
                    denied += 1;
                    if json {
                        println!(
                            "{}",
                            serde_json::json!({"message_id": id, "verdict": "deny", "reason": d.reason})
                        );
                    } else {
                        println!("deny {id}: {}", d.reason);
                    }
                }
                Verdict::Filter(d) => {
                    filtered += 1;
                    if json {
                        println!(
                            "{}",
                            serde_json::json!({"message_id": id, "verdict": "filter", "reason": d.reason})
                        );
                    } else {
                        println!("filter {id}: {}", d.reason);
                    }
                }
            }
        }
    }
    eprintln!(
        "{allowed} allowed, {denied} denied, {filtered} filtered, {refused} refused by validation"
    );
    Ok(())
}

/// One quarantine operation on a zone's admin endpoint.
#[derive(Debug)]
pub enum QuarantineOp {
    /// List entries.
    List {
        /// At most this many.
        limit: usize,
    },
    /// One entry in full.
    Show {
        /// Its message_id.
        id: String,
        /// Its payload digest (a prefix will do) when the id has several entries.
        payload: Option<String>,
    },
    /// Append it and record the release.
    Release {
        /// Its message_id.
        id: String,
        /// Its payload digest (a prefix will do) when the id has several entries.
        payload: Option<String>,
        /// Who.
        by: String,
    },
    /// Discard it and record the drop.
    Drop {
        /// Its message_id.
        id: String,
        /// Its payload digest (a prefix will do) when the id has several entries.
        payload: Option<String>,
        /// Who.
        by: String,
    },
}

/// `bsfg quarantine ...`.
pub async fn quarantine(
    endpoint: &AdminEndpoint,
    op: QuarantineOp,
    json: bool,
) -> anyhow::Result<()> {
    let q = |id: &str, payload: &Option<String>, by: Option<&str>| {
        let mut pairs = vec![("id", id)];
        if let Some(p) = payload {
            pairs.push(("payload", p));
        }
        if let Some(b) = by {
            pairs.push(("by", b));
        }
        serde_urlencoded::to_string(pairs)
    };
    let (method, path) = match &op {
        QuarantineOp::List { limit } => ("GET", format!("/quarantine?limit={limit}")),
        QuarantineOp::Show { id, payload } => (
            "GET",
            format!("/quarantine/entry?{}", q(id, payload, None)?),
        ),
        QuarantineOp::Release { id, payload, by } => (
            "POST",
            format!("/quarantine/release?{}", q(id, payload, Some(by))?),
        ),
        QuarantineOp::Drop { id, payload, by } => (
            "POST",
            format!("/quarantine/drop?{}", q(id, payload, Some(by))?),
        ),
    };
    let (code, body) = admin_request(endpoint, method, &path).await?;
    anyhow::ensure!(code == 200, "{}", body.trim());
    match op {
        QuarantineOp::List { .. } if !json => {
            let entries: Vec<bsfg_core::QuarantineEntry> = serde_json::from_str(&body)?;
            if entries.is_empty() {
                println!("quarantine is empty");
            }
            for e in entries {
                let why = if e.cause == bsfg_core::policy::CAUSE_POLICY {
                    format!(
                        "policy {} ({}): {}",
                        e.denial.policy, e.denial.module_sha256, e.denial.reason
                    )
                } else {
                    e.denial.reason.clone()
                };
                println!(
                    "{}  payload {}  from {} offset {} via link {}  {}",
                    e.message.envelope.message_id,
                    e.payload_short(),
                    e.source_zone,
                    e.source_offset,
                    e.link,
                    why
                );
            }
        }
        QuarantineOp::List { .. } => {
            let entries: Vec<serde_json::Value> = serde_json::from_str(&body)?;
            for e in entries {
                println!("{e}");
            }
        }
        _ => print!("{body}"),
    }
    Ok(())
}
