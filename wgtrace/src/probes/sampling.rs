//! Tracing in windows when packets come fast.
//!
//! Every run of a program costs a few hundred nanoseconds on the CPU that
//! carries the packet, and a busy tunnel runs them hundreds of thousands of
//! times a second: on a host whose CPUs are busy moving packets that is
//! throughput lost (see docs/performance.md). So above a rate of runs
//! (`--max-traced-rate`) wgtrace keeps its programs attached only for short
//! windows, spaced so that on average they run at about that rate, and scales
//! the packet counts seen in a window up to its cycle, as sFlow-style
//! samplers do. A detached program costs nothing: its tracepoint is a
//! patched-out jump again.
//!
//! Tracing is continuous whenever the load is below the limit, for the first
//! seconds after start, and for the first seconds after any tunnel, peer,
//! endpoint, mark or rule changed: that is when transport starts taking a new
//! path, so the first packets of a new path are never in a gap.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use wgtrace_common::{FlowKey, FlowStats};

#[derive(Clone, Debug)]
pub struct Policy {
    /// Program runs per second above which tracing goes to windows; 0 never.
    pub max_runs_per_second: u64,
    /// How long each window (and each measurement of the load) lasts.
    pub window: Duration,
    /// The longest cycle (window plus gap): bounds how stale a view gets and
    /// how long a newly busy flow can go unseen.
    pub max_cycle: Duration,
    /// Continuous tracing after start and after each topology change.
    pub settle: Duration,
}

impl Policy {
    pub fn new(max_runs_per_second: u64) -> Self {
        Self {
            max_runs_per_second,
            window: Duration::from_millis(250),
            max_cycle: Duration::from_secs(5),
            settle: Duration::from_secs(3),
        }
    }
}

/// What the caller must do after [`DutyCycle::step`].
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    Keep,
    /// A measured span of `span` ended, `gap_before` after the previous one
    /// (zero while tracing continuously): fold its counts. With
    /// `detach_for`, detach the programs for that long.
    Fold {
        span: Duration,
        gap_before: Duration,
        detach_for: Option<Duration>,
        runs_per_second: f64,
    },
    /// Attach again: a window starts.
    Attach,
}

#[derive(Debug)]
pub struct DutyCycle {
    policy: Policy,
    attached: bool,
    /// Since the last decision while attached; since detaching otherwise.
    span_started: Instant,
    span_runs: u64,
    /// Since the counts were last folded (while attached).
    fold_started: Instant,
    /// The gap before the current window, until its counts are folded.
    gap_before: Duration,
    reattach_at: Instant,
    full_until: Instant,
    /// True from a detach until the load is found below the limit again.
    windowed: bool,
    started: Instant,
    /// When tracing ended: the share traced stops there.
    ended: Option<Instant>,
    traced_before_span: Duration,
}

impl DutyCycle {
    /// Programs are attached when this is created.
    pub fn new(policy: Policy, now: Instant, runs: u64) -> Self {
        Self {
            full_until: now + policy.settle,
            policy,
            attached: true,
            span_started: now,
            span_runs: runs,
            fold_started: now,
            gap_before: Duration::ZERO,
            reattach_at: now,
            windowed: false,
            started: now,
            ended: None,
            traced_before_span: Duration::ZERO,
        }
    }

    /// The tunnels changed: trace continuously for a while, from now.
    pub fn hold_full(&mut self, now: Instant) {
        self.full_until = now + self.policy.settle;
        if !self.attached {
            self.reattach_at = now;
        }
    }

    /// Whether counts seen now will be folded with an estimate of a gap,
    /// rather than being exact as they stand.
    pub fn windowed(&self) -> bool {
        self.windowed
    }

    pub fn attached(&self) -> bool {
        self.attached
    }

    /// How long the open window has lasted, when its counts will be used to
    /// estimate the gap before it (None otherwise).
    pub fn open_window(&self, now: Instant) -> Option<Duration> {
        (self.attached && !self.gap_before.is_zero()).then(|| now.saturating_duration_since(self.span_started))
    }

    /// A window opens now (the caller attaches), whatever the schedule.
    pub fn attach_now(&mut self, now: Instant, runs: u64) {
        self.attached = true;
        self.gap_before = now.saturating_duration_since(self.span_started);
        self.span_started = now;
        self.fold_started = now;
        self.span_runs = runs;
    }

    /// Attaching again failed: stay detached and try again a window later.
    pub fn attach_failed(&mut self, now: Instant) {
        self.attached = false;
        self.span_started = now.checked_sub(self.gap_before).unwrap_or(now);
        self.gap_before = Duration::ZERO;
        self.reattach_at = now + self.policy.window;
    }

    /// Windows cannot work (detaching failed): trace continuously from now on.
    pub fn give_up_windows(&mut self) {
        self.policy.max_runs_per_second = 0;
    }

    /// Tracing ends and the programs are detached: returns the span and gap
    /// to fold last (a span of zero when already detached: only the gap
    /// since the last window remains).
    pub fn finish(&mut self, now: Instant) -> (Duration, Duration) {
        self.windowed = false;
        self.ended = Some(now);
        if !self.attached {
            return (Duration::ZERO, now.saturating_duration_since(self.span_started));
        }
        self.attached = false;
        self.traced_before_span += now.saturating_duration_since(self.span_started);
        self.span_started = now;
        (now.saturating_duration_since(self.fold_started), std::mem::take(&mut self.gap_before))
    }

    /// Share of the run so far with programs attached.
    pub fn traced_fraction(&self, now: Instant) -> f64 {
        let now = self.ended.map_or(now, |ended| ended.min(now));
        let total = now.saturating_duration_since(self.started).as_secs_f64();
        let current = if self.attached { now.saturating_duration_since(self.span_started) } else { Duration::ZERO };
        if total <= 0.0 { 1.0 } else { ((self.traced_before_span + current).as_secs_f64() / total).min(1.0) }
    }

    /// Called often (every few tens of milliseconds) with the running total
    /// of program runs.
    pub fn step(&mut self, now: Instant, runs: u64) -> Action {
        if !self.attached {
            if now < self.reattach_at {
                return Action::Keep;
            }
            self.attach_now(now, runs);
            return Action::Attach;
        }
        let span = now.saturating_duration_since(self.span_started);
        if span < self.policy.window || span.is_zero() {
            return Action::Keep;
        }
        let runs_per_second = runs.saturating_sub(self.span_runs) as f64 / span.as_secs_f64();
        self.traced_before_span += span;
        self.span_started = now;
        self.span_runs = runs;
        let limit = self.policy.max_runs_per_second as f64;
        let continuous = self.policy.max_runs_per_second == 0 || now < self.full_until || runs_per_second <= limit;
        // Folding reads the whole flow map: only worth it when a gap's
        // estimate is due or a detach may come soon (its rate is then
        // measured since this fold).
        let fold_due = !self.gap_before.is_zero() || (!continuous || runs_per_second > limit / 4.0) && limit > 0.0;
        let detach_for = if continuous {
            self.windowed = false;
            None
        } else {
            let cycle = span.mul_f64(runs_per_second / limit).min(self.policy.max_cycle).max(span);
            self.attached = false;
            self.windowed = true;
            self.reattach_at = now + (cycle - span);
            Some(cycle - span)
        };
        if !fold_due {
            return Action::Keep;
        }
        let fold_span = now.saturating_duration_since(std::mem::replace(&mut self.fold_started, now));
        Action::Fold { span: fold_span, gap_before: std::mem::take(&mut self.gap_before), detach_for, runs_per_second }
    }
}

/// Per-flow packet and byte counts: what the kernel counted, plus for each
/// gap between windows an estimate from the flow's rate in the windows on
/// either side (the mean of the two, so traffic that starts or stops in a
/// gap counts half of it). Exact while tracing is continuous. Bounded by the
/// kernel's flow map: a flow evicted there is dropped here too.
#[derive(Debug, Default)]
pub struct FlowEstimates {
    /// The kernel's raw counts at the last fold.
    folded: HashMap<FlowKey, FlowStats>,
    /// Estimated totals and the last window's rates, per second.
    estimated: HashMap<FlowKey, Estimate>,
}

#[derive(Clone, Copy, Debug, Default)]
struct Estimate {
    packets: f64,
    bytes: f64,
    packet_rate: f64,
    byte_rate: f64,
}

impl FlowEstimates {
    /// Adds what the kernel counted in a span, and the gap before it.
    pub fn fold(&mut self, raw: &HashMap<FlowKey, FlowStats>, span: Duration, gap_before: Duration) {
        let mut estimated = HashMap::with_capacity(raw.len());
        for (key, (packets, bytes)) in self.deltas(raw) {
            let mut estimate = self.estimated.get(key).copied().unwrap_or_default();
            let (packet_rate, byte_rate) = if span.is_zero() {
                (estimate.packet_rate, estimate.byte_rate)
            } else {
                (packets as f64 / span.as_secs_f64(), bytes as f64 / span.as_secs_f64())
            };
            let gap = gap_before.as_secs_f64();
            estimate.packets += packets as f64 + gap * (estimate.packet_rate + packet_rate) / 2.0;
            estimate.bytes += bytes as f64 + gap * (estimate.byte_rate + byte_rate) / 2.0;
            estimate.packet_rate = packet_rate;
            estimate.byte_rate = byte_rate;
            estimated.insert(*key, estimate);
        }
        self.estimated = estimated;
        self.folded = raw.clone();
    }

    /// What the kernel counted since the last fold, per flow it holds now.
    fn deltas<'a>(&self, raw: &'a HashMap<FlowKey, FlowStats>) -> impl Iterator<Item = (&'a FlowKey, (u64, u64))> {
        raw.iter().map(|(key, now)| {
            let before = self.folded.get(key).copied().unwrap_or_default();
            // Counts below the last fold mean the entry was evicted and
            // created anew: all of it is new.
            let delta = if now.packets >= before.packets && now.bytes >= before.bytes {
                (now.packets - before.packets, now.bytes - before.bytes)
            } else {
                (now.packets, now.bytes)
            };
            (key, delta)
        })
    }

    /// The flows with estimated counts. With `exact_since_fold` (tracing is
    /// continuous) what the kernel counted since the last fold is added as
    /// it stands; in windows the open window waits for its fold.
    pub fn flows(&self, raw: &HashMap<FlowKey, FlowStats>, exact_since_fold: bool) -> HashMap<FlowKey, FlowStats> {
        self.deltas(raw)
            .filter_map(|(key, (packets, bytes))| {
                let estimate = self.estimated.get(key).copied().unwrap_or_default();
                let (packets, bytes) = if exact_since_fold {
                    (estimate.packets + packets as f64, estimate.bytes + bytes as f64)
                } else if self.estimated.contains_key(key) {
                    (estimate.packets, estimate.bytes)
                } else {
                    return None;
                };
                let stats = FlowStats { packets: packets.round() as u64, bytes: bytes.round() as u64, ..raw[key] };
                Some((*key, stats))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn policy() -> Policy {
        Policy { max_runs_per_second: 10_000, window: ms(250), max_cycle: ms(5000), settle: ms(3000) }
    }

    fn detaches(action: &Action) -> Option<Duration> {
        match action {
            Action::Fold { detach_for, .. } => *detach_for,
            _ => None,
        }
    }

    /// Steps every 50 ms from `from_ms` to `to_ms`, programs running at
    /// `rate` while attached; returns every action but Keep, with its time.
    fn drive(
        cycle: &mut DutyCycle,
        start: Instant,
        from_ms: u64,
        to_ms: u64,
        rate: u64,
        runs: &mut u64,
    ) -> Vec<(u64, Action)> {
        let mut actions = Vec::new();
        let mut t = from_ms;
        while t < to_ms {
            t += 50;
            if cycle.attached() {
                *runs += rate * 50 / 1000;
            }
            match cycle.step(start + ms(t), *runs) {
                Action::Keep => {}
                action => actions.push((t, action)),
            }
        }
        actions
    }

    /// The attaches and detaches of [`drive`].
    fn simulate(
        cycle: &mut DutyCycle,
        start: Instant,
        from_ms: u64,
        to_ms: u64,
        rate: u64,
        runs: &mut u64,
    ) -> Vec<(u64, Action)> {
        drive(cycle, start, from_ms, to_ms, rate, runs)
            .into_iter()
            .filter(|(_, action)| *action == Action::Attach || detaches(action).is_some())
            .collect()
    }

    #[test]
    fn below_the_limit_tracing_never_stops() {
        let start = Instant::now();
        let mut cycle = DutyCycle::new(policy(), start, 0);
        let mut runs = 0;
        assert!(simulate(&mut cycle, start, 0, 20_000, 9_000, &mut runs).is_empty());
        assert!((cycle.traced_fraction(start + ms(20_000)) - 1.0).abs() < 1e-9);
    }

    #[test]
    fn above_the_limit_windows_keep_the_average_rate_near_it() {
        let start = Instant::now();
        let mut cycle = DutyCycle::new(policy(), start, 0);
        let mut runs = 0;
        // Nothing detaches while settling after start.
        assert!(simulate(&mut cycle, start, 0, 2950, 100_000, &mut runs).is_empty());
        let settled_runs = runs;
        let actions = simulate(&mut cycle, start, 2950, 62_950, 100_000, &mut runs);
        let Action::Fold { span, gap_before, detach_for: Some(gap), runs_per_second } = &actions[0].1 else {
            panic!("{actions:?}")
        };
        assert!((runs_per_second - 100_000.0).abs() < 1.0);
        assert_eq!((*span, *gap_before, *gap), (ms(250), ms(0), ms(2250)));
        assert_eq!(actions[1], (actions[0].0 + 2250, Action::Attach));
        let Action::Fold { gap_before, .. } = &actions[2].1 else { panic!("{actions:?}") };
        assert_eq!(*gap_before, ms(2250), "the next window knows the gap before it");
        // Over the next minute the programs ran at about the limit on average.
        let average = (runs - settled_runs) as f64 / 60.0;
        assert!((9_000.0..12_000.0).contains(&average), "{average} runs/s");
        let fraction = cycle.traced_fraction(start + ms(62_950));
        assert!((0.1..0.2).contains(&fraction), "{fraction}");
    }

    #[test]
    fn the_cycle_is_capped_and_tracing_resumes_when_the_load_drops() {
        let start = Instant::now();
        let mut cycle = DutyCycle::new(policy(), start, 0);
        let mut runs = 0;
        let actions = simulate(&mut cycle, start, 0, 10_000, 10_000_000, &mut runs);
        assert_eq!(detaches(&actions[0].1), Some(ms(4750)));
        simulate(&mut cycle, start, 10_000, 30_000, 1_000, &mut runs);
        assert!(cycle.attached() && !cycle.windowed(), "continuous again once quiet");
    }

    #[test]
    fn a_topology_change_reattaches_at_once_and_holds() {
        let start = Instant::now();
        let mut cycle = DutyCycle::new(policy(), start, 0);
        let mut runs = 0;
        simulate(&mut cycle, start, 0, 3300, 100_000, &mut runs);
        assert!(!cycle.attached());
        cycle.hold_full(start + ms(3300));
        assert_eq!(cycle.step(start + ms(3310), runs), Action::Attach);
        let actions = simulate(&mut cycle, start, 3310, 6250, 100_000, &mut runs);
        assert!(actions.is_empty(), "held attached while settling: {actions:?}");
    }

    #[test]
    fn a_light_load_never_reads_the_flow_map() {
        let start = Instant::now();
        let mut cycle = DutyCycle::new(policy(), start, 0);
        let mut runs = 0;
        assert_eq!(drive(&mut cycle, start, 0, 10_000, 2_000, &mut runs), vec![]);
        // Near the limit, folds keep the rate measured over one span.
        let actions = drive(&mut cycle, start, 10_000, 11_000, 5_000, &mut runs);
        assert!(matches!(actions[0].1, Action::Fold { detach_for: None, .. }), "{actions:?}");
    }

    #[test]
    fn a_change_during_a_window_folds_its_gap_and_goes_continuous() {
        let start = Instant::now();
        let mut cycle = DutyCycle::new(policy(), start, 0);
        let mut runs = 0;
        let actions = simulate(&mut cycle, start, 0, 5300, 100_000, &mut runs);
        let (attached_at, _) = actions.iter().find(|(_, a)| *a == Action::Attach).unwrap();
        let attached_at = *attached_at;
        assert!(cycle.attached() && cycle.windowed());
        cycle.hold_full(start + ms(attached_at + 50));
        let action = cycle.step(start + ms(attached_at + 300), runs);
        let Action::Fold { gap_before, detach_for: None, .. } = action else { panic!("{action:?}") };
        assert_eq!(gap_before, ms(2250));
        assert!(!cycle.windowed(), "counts are exact again");
    }

    #[test]
    fn finishing_returns_what_is_left_to_fold_and_stops_the_clock() {
        let start = Instant::now();
        let mut cycle = DutyCycle::new(policy(), start, 0);
        let mut runs = 0;
        simulate(&mut cycle, start, 0, 3100, 100_000, &mut runs);
        assert!(!cycle.attached(), "detached at 3000 ms");
        // Ending in the gap: nothing observed, 1 s of gap to estimate.
        let mut ended_in_gap = DutyCycle { started: cycle.started, ..DutyCycle::new(policy(), start, 0) };
        ended_in_gap.attached = false;
        ended_in_gap.span_started = start + ms(3000);
        assert_eq!(ended_in_gap.finish(start + ms(4000)), (ms(0), ms(1000)));
        // Ending 100 ms into the next window: that span and the gap before it.
        let actions = simulate(&mut cycle, start, 3100, 5300, 100_000, &mut runs);
        assert_eq!(actions, vec![(5250, Action::Attach)]);
        assert_eq!(cycle.open_window(start + ms(5350)), Some(ms(100)));
        assert_eq!(cycle.finish(start + ms(5350)), (ms(100), ms(2250)));
        let fraction = cycle.traced_fraction(start + ms(5350));
        assert_eq!(cycle.traced_fraction(start + ms(60_000)), fraction, "the share stops at the end");
        let mut quiet = DutyCycle::new(policy(), start, 0);
        quiet.finish(start + ms(2000));
        assert_eq!(quiet.traced_fraction(start + ms(9000)), 1.0, "continuous to the end is all of it");
    }

    #[test]
    fn a_failed_attach_retries_a_window_later_with_the_whole_gap() {
        let start = Instant::now();
        let mut cycle = DutyCycle::new(policy(), start, 0);
        let mut runs = 0;
        simulate(&mut cycle, start, 0, 5250, 100_000, &mut runs);
        assert!(cycle.attached());
        cycle.attach_failed(start + ms(5250));
        assert!(!cycle.attached());
        assert_eq!(cycle.step(start + ms(5400), runs), Action::Keep);
        assert_eq!(cycle.step(start + ms(5500), runs), Action::Attach);
        assert_eq!(cycle.open_window(start + ms(5500)), Some(ms(0)));
        assert_eq!(cycle.gap_before, ms(2500), "the gap runs from the detach to the attach that worked");
    }

    #[test]
    fn zero_means_always_continuous() {
        let start = Instant::now();
        let mut cycle = DutyCycle::new(Policy { max_runs_per_second: 0, ..policy() }, start, 0);
        let mut runs = 0;
        assert!(simulate(&mut cycle, start, 0, 20_000, 10_000_000, &mut runs).is_empty());
    }

    fn key(sport: u16) -> FlowKey {
        FlowKey { sport, ..FlowKey::default() }
    }

    fn stats(packets: u64) -> FlowStats {
        FlowStats { packets, bytes: packets * 100, last_seen_ns: packets }
    }

    #[test]
    fn gaps_are_estimated_from_the_windows_on_either_side() {
        let mut estimates = FlowEstimates::default();
        // Continuous for a second: 1000 packets.
        estimates.fold(&HashMap::from([(key(1), stats(1000))]), ms(1000), ms(0));
        // A 250 ms window after a 2250 ms gap, still 1000 packets/s.
        estimates.fold(&HashMap::from([(key(1), stats(1250))]), ms(250), ms(2250));
        let raw = HashMap::from([(key(1), stats(1250))]);
        assert_eq!(estimates.flows(&raw, false)[&key(1)].packets, 3500);
        assert_eq!(estimates.flows(&raw, false)[&key(1)].bytes, 350_000);
        // The flow stopped in the next gap: the window after it saw nothing,
        // so the gap counts half its rate.
        estimates.fold(&raw, ms(250), ms(2250));
        assert_eq!(estimates.flows(&raw, false)[&key(1)].packets, 3500 + 1125);
        assert_eq!(estimates.flows(&raw, false)[&key(1)].last_seen_ns, 1250, "last seen is the kernel's");
    }

    #[test]
    fn continuous_counts_are_exact_and_survive_eviction() {
        let mut estimates = FlowEstimates::default();
        estimates.fold(&HashMap::from([(key(1), stats(10))]), ms(250), ms(0));
        let raw = HashMap::from([(key(1), stats(15)), (key(2), stats(2))]);
        // Unfolded counts show as they are while continuous...
        assert_eq!(estimates.flows(&raw, true)[&key(1)].packets, 15);
        assert_eq!(estimates.flows(&raw, true)[&key(2)].packets, 2);
        // ...and wait for their window's fold otherwise.
        assert_eq!(estimates.flows(&raw, false)[&key(1)].packets, 10);
        assert!(!estimates.flows(&raw, false).contains_key(&key(2)));
        estimates.fold(&raw, ms(250), ms(0));
        assert!(estimates.estimated.contains_key(&key(2)));
        // Flow 1 evicted and created anew with 3 packets; flow 2 gone.
        let raw = HashMap::from([(key(1), stats(3))]);
        estimates.fold(&raw, ms(250), ms(0));
        assert_eq!(estimates.flows(&raw, true)[&key(1)].packets, 18);
        assert!(!estimates.estimated.contains_key(&key(2)), "bounded by the kernel's map");
    }

    #[test]
    fn finishing_in_a_gap_extrapolates_the_last_rate() {
        let mut estimates = FlowEstimates::default();
        let raw = HashMap::from([(key(1), stats(100))]);
        estimates.fold(&raw, ms(100), ms(0));
        estimates.fold(&raw, ms(0), ms(500));
        assert_eq!(estimates.flows(&raw, true)[&key(1)].packets, 600);
    }
}
