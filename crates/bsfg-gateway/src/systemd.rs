//! The service manager's side of a `Type=notify` unit: readiness, the watchdog,
//! reloads and stops, sent to `$NOTIFY_SOCKET` (nothing happens without one, so the
//! same binary runs anywhere).

use std::time::Duration;

use sd_notify::NotifyState;

/// Sends `states` to the service manager, if one listens; a failure is logged, never
/// fatal (the gateway serves the same either way).
pub fn notify(states: &[NotifyState<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::warn!(error = %e, "could not notify the service manager");
    }
}

/// How often to ping the watchdog: half of `WATCHDOG_USEC`, when it is set for this
/// process (`WATCHDOG_PID` absent or ours, as libsystemd's `sd_watchdog_enabled`).
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.parse::<u32>().ok()? != std::process::id()
    {
        return None;
    }
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

/// Pings the watchdog every `interval` for as long as the process runs: proof that
/// the runtime still schedules tasks (a store outage is readiness, not a hang, so it
/// does not stop the pings and does not get the gateway restarted).
pub async fn watchdog(interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        notify(&[NotifyState::Watchdog]);
    }
}
