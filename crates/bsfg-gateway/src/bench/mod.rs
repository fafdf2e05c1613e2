//! `bsfg bench ...`: benchmarks that print numbers against a baseline measured in the
//! same run. Built only with the `bench` feature, so the shipping binary links no test
//! emulator, no TUN code and no throwaway PKI.

pub mod artifacts;
pub mod index;
pub mod pipeline;
pub mod policy;
pub mod soak;
pub mod transports;

use clap::Subcommand;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// AppendFact over gRPC vs raw JetStream publish, both flush settings.
    Append(pipeline::AppendBench),
    /// A backlog drained from zone A to zone B by a link over gRPC, beside native
    /// JetStream sourcing over a leaf node and a raw fetch+publish copier.
    Replicate(pipeline::ReplicateBench),
    /// Replication over gRPC and QUIC across the same emulated link, for a matrix of
    /// round-trip times and loss rates (needs root: network namespaces, TUN).
    Transports(transports::TransportsBench),
    /// Artifact throughput of a link over gRPC and QUIC across the emulated link, for
    /// a matrix of round-trip times and loss rates, beside the same link's fact
    /// throughput (needs root).
    Artifacts(artifacts::ArtifactsBench),
    /// Per-fact cost of a WASM policy at batch sizes 1, 100, 1000, and replication
    /// with and without it at a link's intake.
    Policy(policy::PolicyBench),
    /// What remembering message_ids costs the zone's nats-server: memory and disk per
    /// million ids, and the append rate as the index grows.
    Index(index::IndexBench),
    /// Before go-live: N facts across three zones (real gateways and nats-servers)
    /// through seeded SIGKILLs, blackholes and a lossy QUIC hop; every zone's stream
    /// read back and compared (0 lost, 0 duplicated).
    Soak(soak::SoakBench),
}

/// Runs one benchmark.
pub async fn run(which: BenchCommand) -> anyhow::Result<()> {
    // The append benchmark prints its table alone; the others log what they set up.
    if !matches!(which, BenchCommand::Append(_)) {
        let _ = crate::init_tracing(crate::LogFormat::Text, None, None);
    }
    match which {
        BenchCommand::Append(opts) => pipeline::append(opts).await,
        BenchCommand::Replicate(opts) => pipeline::replicate(opts).await,
        BenchCommand::Transports(opts) => transports::transports(opts).await,
        BenchCommand::Artifacts(opts) => artifacts::artifacts(opts).await,
        BenchCommand::Index(opts) => index::index(opts).await,
        BenchCommand::Policy(opts) => policy::policy(opts).await,
        BenchCommand::Soak(opts) => soak::soak(opts).await,
    }
}
