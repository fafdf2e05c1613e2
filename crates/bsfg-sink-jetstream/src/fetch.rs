//! FetchFacts and ConfirmReceipt on durable pull consumers with explicit acks.
//!
//! The frontier is the consumer's ack floor: JetStream only advances it over a
//! gap-free prefix of acknowledged offsets. A consumer reads one class of the log
//! stream (its subject filter); the sequences of other classes and of index messages
//! are never delivered and the ack floor passes over them. A page's `first_offset`
//! and `last_offset` are the class's, read from its chain and head
//! ([`crate::index::class_range`]), so facts that expired before this consumer
//! confirmed them show as a gap, and other messages of the log never do.
//!
//! A confirm of offset X acknowledges the deliveries **of the page that delivered X**,
//! up to X, with double acks so the server has applied them before the frontier is
//! read back. It never acknowledges another page: a page handed to a receiver that
//! crashed before appending it, or to another instance sharing the consumer, stays
//! unacknowledged and comes again after the ack wait. So a receiver can only ever
//! confirm facts it actually received: each delivery is remembered with its
//! receiver (the authenticated identity), and a confirm from another receiver is
//! `failed_precondition` and acknowledges nothing.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::error::unavailable;
use async_nats::jetstream::{
    self,
    consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull},
    context::ConsumerInfoErrorKind,
    stream::Stream,
};
use bsfg_core::{
    BoundaryError, FactPage, FetchRequest, FetchedFact, Frontier, Message, Provenance,
};

use crate::append::{HDR_LINK, HDR_SOURCE_OFFSET, HDR_SOURCE_STREAM, HDR_SOURCE_ZONE};
use futures::StreamExt;

use crate::config::ConsumerConfig;
use crate::error::SinkError;

/// The latest delivery of each unconfirmed offset through this gateway, and the
/// receivers of offsets confirmed above the frontier (so a repeated confirm is
/// answered, not refused).
#[derive(Default)]
struct Deliveries {
    /// stream offset -> its latest delivery.
    pending: BTreeMap<u64, Delivery>,
    /// stream offset -> receiver that confirmed it; pruned at the frontier.
    confirmed: BTreeMap<u64, Arc<str>>,
}

struct Delivery {
    page: u64,
    ack: String,
    receiver: Arc<str>,
}

/// A declared consumer and the ack handles of what this gateway delivered.
pub(crate) struct ConsumerHandle {
    /// The class's stream name as the API shows it (`facts_<class>`).
    pub stream_name: String,
    /// The class read.
    pub class: String,
    pub stream: Stream,
    pub consumer: PullConsumer,
    /// What this gateway delivered and which receiver confirmed what.
    deliveries: Mutex<Deliveries>,
    /// Page counter: every fetch is a new page.
    pages: std::sync::atomic::AtomicU64,
    /// Most bytes (as the server counts them) one page loads: the server stops
    /// delivering there, so a page of large facts is never loaded whole only to be
    /// trimmed by its transport.
    page_max_bytes: usize,
}

/// The byte budget of a page: twice the largest fact (a transport's message limit is at
/// least that), plus room for the headers and subjects of the facts in it. Every
/// stored fact fits it, so a page always carries at least one.
pub(crate) fn page_budget(max_fact_bytes: Option<usize>) -> usize {
    2 * max_fact_bytes.unwrap_or(bsfg_core::Limits::default().max_fact_bytes) + 64 * 1024
}

pub(crate) fn consumer_config(c: &ConsumerConfig) -> pull::Config {
    let filter_subjects = if c.subject_kinds.is_empty() {
        vec![crate::index::class_filter(&c.class)]
    } else {
        c.subject_kinds
            .iter()
            .map(|k| format!("{}.{}.{k}.*", crate::index::FACTS_PREFIX, c.class))
            .collect()
    };
    pull::Config {
        durable_name: Some(c.name.clone()),
        description: Some("BSFG durable consumer".into()),
        ack_policy: AckPolicy::Explicit,
        deliver_policy: DeliverPolicy::All,
        ack_wait: c.ack_wait,
        max_ack_pending: c.max_ack_pending,
        filter_subjects,
        ..Default::default()
    }
}

fn conflict(name: &str, field: &'static str, existing: String, wanted: String) -> SinkError {
    SinkError::conflict("consumer", name, field, existing, wanted)
}

/// Creates the consumer or verifies an existing one.
pub(crate) async fn ensure(
    stream: &Stream,
    c: &ConsumerConfig,
    stream_name: String,
    page_max_bytes: usize,
) -> Result<ConsumerHandle, SinkError> {
    let wanted = consumer_config(c);
    let consumer: PullConsumer = match stream.consumer_info(&c.name).await {
        Ok(info) => {
            let cfg = &info.config;
            let mut have = cfg.filter_subjects.clone();
            if !cfg.filter_subject.is_empty() {
                have.push(cfg.filter_subject.clone());
            }
            have.sort();
            let mut want = wanted.filter_subjects.clone();
            want.sort();
            if have != want {
                return Err(conflict(
                    &c.name,
                    "filter_subjects",
                    format!("{have:?}"),
                    format!("{want:?}"),
                ));
            }
            if cfg.ack_policy != AckPolicy::Explicit {
                return Err(conflict(
                    &c.name,
                    "ack_policy",
                    format!("{:?}", cfg.ack_policy),
                    "Explicit".into(),
                ));
            }
            if cfg.ack_wait != wanted.ack_wait {
                return Err(conflict(
                    &c.name,
                    "ack_wait",
                    format!("{:?}", cfg.ack_wait),
                    format!("{:?}", wanted.ack_wait),
                ));
            }
            stream
                .get_consumer(&c.name)
                .await
                .map_err(|e| SinkError::js("get consumer", e))?
        }
        // Only a consumer the server says does not exist is created; any other
        // failure is reported rather than turned into a create attempt.
        Err(e) if e.kind() == ConsumerInfoErrorKind::NotFound => stream
            .create_consumer(wanted)
            .await
            .map_err(|e| SinkError::js("create consumer", e))?,
        Err(e) => return Err(SinkError::js("consumer info", e)),
    };
    Ok(ConsumerHandle {
        stream_name,
        class: c.class.clone(),
        stream: stream.clone(),
        consumer,
        deliveries: Mutex::new(Deliveries::default()),
        pages: std::sync::atomic::AtomicU64::new(0),
        page_max_bytes,
    })
}

/// Reads the provenance headers a link wrote beside a replicated fact.
fn provenance(h: &async_nats::HeaderMap) -> Option<Provenance> {
    let get = |k: &str| h.get(k).map(|v| v.as_str().to_owned());
    Some(Provenance {
        zone: get(HDR_SOURCE_ZONE)?,
        stream: get(HDR_SOURCE_STREAM).unwrap_or_default(),
        offset: get(HDR_SOURCE_OFFSET)?.parse().ok()?,
        link: get(HDR_LINK).unwrap_or_default(),
    })
}

fn unix_ms(t: time::OffsetDateTime) -> i64 {
    (t.unix_timestamp_nanos() / 1_000_000) as i64
}

impl ConsumerHandle {
    async fn pull(
        &self,
        limit: usize,
        wait: Option<Duration>,
    ) -> Result<Vec<jetstream::Message>, BoundaryError> {
        let stream = match wait {
            None => {
                self.consumer
                    .fetch()
                    .max_messages(limit)
                    .max_bytes(self.page_max_bytes)
                    .messages()
                    .await
            }
            Some(w) => {
                self.consumer
                    .batch()
                    .max_messages(limit)
                    .max_bytes(self.page_max_bytes)
                    .expires(w)
                    .messages()
                    .await
            }
        }
        .map_err(|e| unavailable("fetch", e))?;
        let mut stream = std::pin::pin!(stream);
        let mut msgs = Vec::new();
        while let Some(m) = stream.next().await {
            match m {
                Ok(m) => msgs.push(m),
                // The server ends a pull with a byte budget by one of these statuses
                // (the budget reached, or the request done): the page is what came
                // before it.
                Err(e)
                    if ["Exceeds MaxBytes", "Batch Completed"]
                        .iter()
                        .any(|s| e.to_string().contains(s)) =>
                {
                    break;
                }
                Err(e) => return Err(unavailable("fetch", e)),
            }
        }
        Ok(msgs)
    }

    /// One page: whatever is ready now, else wait for the first fact up to `wait`.
    pub async fn fetch(
        &self,
        zone: &str,
        req: &FetchRequest,
        receiver: &str,
    ) -> Result<FactPage, BoundaryError> {
        let receiver: Arc<str> = Arc::from(receiver);
        let limit = req.limit as usize;
        let mut msgs = self.pull(limit, None).await?;
        if msgs.is_empty() && req.wait >= Duration::from_millis(1) {
            // Long-poll for one, then take whatever else is ready without waiting.
            msgs = self.pull(1, Some(req.wait)).await?;
            if !msgs.is_empty() && limit > 1 {
                msgs.extend(self.pull(limit - 1, None).await?);
            }
        }
        let mut facts = Vec::with_capacity(msgs.len());
        let page = self
            .pages
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        {
            let mut deliveries = self
                .deliveries
                .lock()
                .map_err(|_| BoundaryError::Internal("delivered map poisoned".into()))?;
            for m in msgs {
                let info = m.info().map_err(|e| unavailable("message info", e))?;
                let offset = info.stream_sequence;
                let message: Message =
                    bsfg_core::model::decode_stored(&m.payload).map_err(|e| {
                        BoundaryError::Internal(format!(
                            "stream {} offset {offset} is not a BSFG fact: {e}",
                            self.stream_name
                        ))
                    })?;
                facts.push(FetchedFact {
                    offset,
                    appended_at_unix_ms: unix_ms(info.published),
                    delivery_count: info.delivered.max(1) as u64,
                    message,
                    provenance: m.headers.as_ref().and_then(provenance),
                });
                if let Some(reply) = &m.reply {
                    deliveries.confirmed.remove(&offset);
                    deliveries.pending.insert(
                        offset,
                        Delivery {
                            page,
                            ack: reply.to_string(),
                            receiver: receiver.clone(),
                        },
                    );
                }
            }
        }
        facts.sort_by_key(|f| f.offset);
        let (range, cinfo) = futures::join!(
            crate::index::class_range(&self.stream, &self.class),
            self.consumer.get_info()
        );
        let (first_offset, last_offset) = range.map_err(BoundaryError::Unavailable)?;
        let cinfo = cinfo.map_err(|e| unavailable("consumer info", e))?;
        Ok(FactPage {
            zone: zone.to_owned(),
            stream: self.stream_name.clone(),
            facts,
            first_offset,
            last_offset,
            frontier: cinfo.ack_floor.stream_sequence,
            pending: cinfo.num_pending + cinfo.num_ack_pending as u64,
        })
    }

    /// Acknowledges what this gateway delivered to `receiver` on the page that
    /// delivered `offset`, up to `offset`; returns the frontier.
    pub async fn confirm(
        &self,
        client: &async_nats::Client,
        name: &str,
        offset: u64,
        receiver: &str,
    ) -> Result<Frontier, BoundaryError> {
        let info = self
            .consumer
            .get_info()
            .await
            .map_err(|e| unavailable("consumer info", e))?;
        let highest = info.delivered.stream_sequence;
        if offset > highest {
            return Err(BoundaryError::invalid(
                "offset",
                format!(
                    "must not exceed the highest offset delivered to consumer `{name}` ({highest})"
                ),
            ));
        }
        let floor = info.ack_floor.stream_sequence;
        if offset <= floor {
            return Ok(Frontier { offset: floor });
        }
        let not_yours = || {
            BoundaryError::FailedPrecondition(format!(
                "offset {offset} of consumer `{name}` was not delivered to this caller by this gateway (another receiver holds it, or it was delivered before a restart); fetch again"
            ))
        };
        let to_ack: Vec<(u64, String)> = {
            let deliveries = self
                .deliveries
                .lock()
                .map_err(|_| BoundaryError::Internal("delivered map poisoned".into()))?;
            match deliveries.pending.get(&offset) {
                Some(d) if &*d.receiver == receiver => {
                    let page = d.page;
                    deliveries
                        .pending
                        .range(..=offset)
                        .filter(|(_, d)| d.page == page)
                        .map(|(k, d)| (*k, d.ack.clone()))
                        .collect()
                }
                Some(_) => return Err(not_yours()),
                // Confirmed already by the same receiver (a retried confirm): nothing
                // more to acknowledge; report the frontier as it stands.
                None if deliveries
                    .confirmed
                    .get(&offset)
                    .is_some_and(|r| &**r == receiver) =>
                {
                    Vec::new()
                }
                None => return Err(not_yours()),
            }
        };
        let acked: Vec<u64> = to_ack.iter().map(|(k, _)| *k).collect();
        // Acknowledgements travel in order on the one connection and the server
        // applies a consumer's acks in the order it reads them: all but the last are
        // published, the last is a request (double ack) answered after the ones
        // before it. One round trip per confirm instead of one per fact. An ack the
        // server did not apply leaves its fact unacknowledged: it is delivered again
        // after ack_wait (at-least-once), and the frontier read below never covers it.
        let mut to_ack = to_ack;
        if let Some((_, last)) = to_ack.pop() {
            let mut failed = 0usize;
            for (_, subject) in to_ack {
                if client
                    .publish(subject, bytes::Bytes::from_static(b"+ACK"))
                    .await
                    .is_err()
                {
                    failed += 1;
                }
            }
            let answered = tokio::time::timeout(
                Duration::from_secs(5),
                client.request(last, bytes::Bytes::from_static(b"+ACK")),
            )
            .await;
            if failed > 0 || !matches!(answered, Ok(Ok(_))) {
                tracing::warn!(
                    consumer = name,
                    failed,
                    "some acknowledgements were not confirmed by the server"
                );
            }
        }
        let info = self
            .consumer
            .get_info()
            .await
            .map_err(|e| unavailable("consumer info", e))?;
        let frontier = info.ack_floor.stream_sequence;
        if let Ok(mut deliveries) = self.deliveries.lock() {
            let receiver: Arc<str> = Arc::from(receiver);
            for k in &acked {
                deliveries.pending.remove(k);
                deliveries.confirmed.insert(*k, receiver.clone());
            }
            // Offsets at or below the frontier are acknowledged by someone: forget them.
            deliveries.pending = deliveries.pending.split_off(&(frontier + 1));
            deliveries.confirmed = deliveries.confirmed.split_off(&(frontier + 1));
        }
        Ok(Frontier { offset: frontier })
    }
}
