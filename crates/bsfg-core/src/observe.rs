//! The one forwarding layer around a [`BoundaryApi`]: [`Observed`] passes every
//! call through unchanged (the receiver of `_as` calls included), optionally bounded
//! in time, and shows each call and its outcome to an [`Observer`]. The zone's API
//! metrics, a link's counters and timeouts, and the benchmarks' latency probes are
//! observers, not wrappers of their own.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::error::BoundaryError;
use crate::model::Message;
use crate::ports::{
    ApiResult, AppendOutcome, BoundaryApi, ByteStream, FactPage, FetchRequest, Frontier,
    ObjectInfo, ObjectRead,
};

/// Which operation a call is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// AppendFact.
    Append,
    /// FetchFacts, with the long-poll wait it asked for.
    Fetch {
        /// The request's wait.
        wait: Duration,
    },
    /// ConfirmReceipt up to `offset`.
    Confirm {
        /// The offset confirmed.
        offset: u64,
    },
    /// PutObject.
    PutObject,
    /// HeadObject.
    HeadObject,
    /// GetObject from byte `offset` (the call until its body starts; the body
    /// streams on its own).
    GetObject {
        /// Where the read starts.
        offset: u64,
    },
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Op::Append => "append",
            Op::Fetch { .. } => "fetch",
            Op::Confirm { .. } => "confirm",
            Op::PutObject => "put_object",
            Op::HeadObject => "head_object",
            Op::GetObject { .. } => "get_object",
        })
    }
}

/// What a call returned, by reference.
#[derive(Debug, Clone, Copy)]
pub enum Outcome<'a> {
    /// An append's answer.
    Appended(&'a AppendOutcome),
    /// A fetched page.
    Page(&'a FactPage),
    /// A confirm's frontier.
    Frontier(&'a Frontier),
    /// A stored object (PutObject, HeadObject, and a GetObject's object).
    Object(&'a ObjectInfo),
}

/// Sees every call through an [`Observed`] API.
pub trait Observer: Send + Sync {
    /// How long the call may take; past it, it fails as `unavailable` (naming the
    /// operation and the limit). `None`: no limit (the default).
    fn deadline(&self, op: Op) -> Option<Duration> {
        let _ = op;
        None
    }
    /// After each call: what it was, how long it took, and what it returned.
    fn observed(&self, op: Op, elapsed: Duration, outcome: Result<Outcome<'_>, &BoundaryError>);
}

impl<T: Observer + ?Sized> Observer for Arc<T> {
    fn deadline(&self, op: Op) -> Option<Duration> {
        (**self).deadline(op)
    }
    fn observed(&self, op: Op, elapsed: Duration, outcome: Result<Outcome<'_>, &BoundaryError>) {
        (**self).observed(op, elapsed, outcome)
    }
}

/// `inner`, with every call shown to `observer` (see the module documentation).
pub struct Observed<O> {
    /// The API called.
    pub inner: Arc<dyn BoundaryApi>,
    /// Who sees the calls.
    pub observer: O,
}

impl<O: Observer> Observed<O> {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn BoundaryApi>, observer: O) -> Self {
        Observed { inner, observer }
    }

    async fn run<T>(
        &self,
        op: Op,
        call: impl std::future::Future<Output = Result<T, BoundaryError>>,
        view: fn(&T) -> Outcome<'_>,
    ) -> Result<T, BoundaryError> {
        let started = Instant::now();
        let r = match self.observer.deadline(op) {
            Some(limit) => tokio::time::timeout(limit, call).await.unwrap_or_else(|_| {
                Err(BoundaryError::Unavailable(format!(
                    "{op} took longer than {limit:?}"
                )))
            }),
            None => call.await,
        };
        self.observer
            .observed(op, started.elapsed(), r.as_ref().map(view));
        r
    }
}

#[async_trait]
impl<O: Observer> BoundaryApi for Observed<O> {
    async fn append_fact(&self, message: Message) -> Result<AppendOutcome, BoundaryError> {
        self.run(Op::Append, self.inner.append_fact(message), |a| {
            Outcome::Appended(a)
        })
        .await
    }
    async fn append_facts(
        &self,
        messages: Vec<Message>,
    ) -> ApiResult<Vec<ApiResult<AppendOutcome>>> {
        // Forwarded whole (a remote client sends one request); each fact is observed
        // where the serving side appends it.
        self.inner.append_facts(messages).await
    }
    async fn fetch_facts(&self, request: FetchRequest) -> Result<FactPage, BoundaryError> {
        let op = Op::Fetch { wait: request.wait };
        self.run(op, self.inner.fetch_facts(request), |p| Outcome::Page(p))
            .await
    }
    async fn confirm_receipt(&self, consumer: &str, offset: u64) -> ApiResult<Frontier> {
        let call = self.inner.confirm_receipt(consumer, offset);
        self.run(Op::Confirm { offset }, call, |f| Outcome::Frontier(f))
            .await
    }
    async fn fetch_facts_as(&self, receiver: &str, request: FetchRequest) -> ApiResult<FactPage> {
        let op = Op::Fetch { wait: request.wait };
        self.run(op, self.inner.fetch_facts_as(receiver, request), |p| {
            Outcome::Page(p)
        })
        .await
    }
    async fn confirm_receipt_as(
        &self,
        receiver: &str,
        consumer: &str,
        offset: u64,
    ) -> ApiResult<Frontier> {
        let call = self.inner.confirm_receipt_as(receiver, consumer, offset);
        self.run(Op::Confirm { offset }, call, |f| Outcome::Frontier(f))
            .await
    }
    async fn put_object(&self, bucket: &str, key: &str, body: ByteStream) -> ApiResult<ObjectInfo> {
        let call = self.inner.put_object(bucket, key, body);
        self.run(Op::PutObject, call, |o| Outcome::Object(o)).await
    }
    async fn head_object(&self, bucket: &str, key: &str) -> ApiResult<ObjectInfo> {
        let call = self.inner.head_object(bucket, key);
        self.run(Op::HeadObject, call, |o| Outcome::Object(o)).await
    }
    async fn get_object(&self, bucket: &str, key: &str, offset: u64) -> ApiResult<ObjectRead> {
        let call = self.inner.get_object(bucket, key, offset);
        self.run(Op::GetObject { offset }, call, |r| Outcome::Object(&r.info))
            .await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use std::sync::Mutex;

    /// Answers fetches after `delay`; everything else at once.
    struct Slow(Duration);

    #[async_trait]
    impl BoundaryApi for Slow {
        async fn append_fact(&self, _: Message) -> Result<AppendOutcome, BoundaryError> {
            Err(BoundaryError::invalid("fact.subject", "bad"))
        }
        async fn fetch_facts(&self, _: FetchRequest) -> Result<FactPage, BoundaryError> {
            tokio::time::sleep(self.0).await;
            Ok(FactPage::default())
        }
        async fn confirm_receipt(&self, _: &str, offset: u64) -> Result<Frontier, BoundaryError> {
            Ok(Frontier { offset })
        }
        async fn fetch_facts_as(&self, receiver: &str, _: FetchRequest) -> ApiResult<FactPage> {
            Ok(FactPage {
                zone: receiver.to_owned(),
                ..FactPage::default()
            })
        }
        async fn put_object(&self, _: &str, _: &str, _: ByteStream) -> ApiResult<ObjectInfo> {
            Err(BoundaryError::Unavailable("no store".into()))
        }
        async fn head_object(&self, b: &str, k: &str) -> ApiResult<ObjectInfo> {
            Err(BoundaryError::NotFound(format!("{b}/{k}")))
        }
        async fn get_object(&self, b: &str, k: &str, _: u64) -> ApiResult<ObjectRead> {
            Err(BoundaryError::NotFound(format!("{b}/{k}")))
        }
    }

    #[derive(Default)]
    struct Log(Mutex<Vec<(String, bool)>>);

    impl Observer for Log {
        fn deadline(&self, op: Op) -> Option<Duration> {
            matches!(op, Op::Fetch { .. }).then_some(Duration::from_millis(50))
        }
        fn observed(&self, op: Op, _: Duration, outcome: Result<Outcome<'_>, &BoundaryError>) {
            self.0
                .lock()
                .unwrap()
                .push((op.to_string(), outcome.is_ok()));
        }
    }

    fn request() -> FetchRequest {
        FetchRequest {
            consumer: "c".into(),
            limit: 1,
            wait: Duration::ZERO,
        }
    }

    #[tokio::test]
    async fn every_call_is_forwarded_unchanged_observed_and_bounded_where_the_observer_says() {
        let api = Observed::new(Arc::new(Slow(Duration::from_secs(5))), Log::default());
        let e = api.append_fact(Message::default()).await.unwrap_err();
        assert_eq!(
            e.field(),
            Some("fact.subject"),
            "errors pass through unchanged"
        );
        let e = api.fetch_facts(request()).await.unwrap_err();
        assert!(e.to_string().contains("fetch took longer than 50ms"), "{e}");
        // The receiver of an `_as` call reaches the inner API.
        let page = api
            .fetch_facts_as("idmz-bsfg@idmz", request())
            .await
            .unwrap();
        assert_eq!(page.zone, "idmz-bsfg@idmz");
        assert_eq!(api.confirm_receipt("c", 7).await.unwrap().offset, 7);
        let body = Box::pin(futures::stream::empty());
        assert!(api.put_object("b", "k", body).await.is_err());
        let e = api.get_object("b", "k", 3).await.unwrap_err();
        assert_eq!(e, BoundaryError::NotFound("b/k".into()));
        let log = api.observer.0.lock().unwrap().clone();
        let expected = [
            ("append", false),
            ("fetch", false),
            ("fetch", true),
            ("confirm", true),
            ("put_object", false),
            ("get_object", false),
        ];
        assert_eq!(
            log,
            expected.map(|(o, ok)| (o.to_owned(), ok)).to_vec(),
            "each call observed once, with its outcome"
        );
    }
}
