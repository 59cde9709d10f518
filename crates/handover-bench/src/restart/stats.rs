//! The pure part of the `restart` scenario: what one request's record holds,
//! which phase a request belongs to, and percentiles. No clocks here, so it
//! is tested without timing anything.

/// How one request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    /// `200 OK` with the whole body, `generation G pid P`.
    Ok,
    /// The connection was refused (nothing listening).
    Refused,
    /// Reset or aborted by the server, or a broken pipe while sending.
    Reset,
    /// No connection, or no end of the answer, within the timeout.
    Timeout,
    /// An answer other than `200 OK`.
    NotOk,
    /// A `200 OK` whose body is shorter than its Content-Length, or is not
    /// the demo server's, or an empty answer.
    Short,
    /// Any other I/O error.
    Other,
}

impl Outcome {
    pub const FAILURES: [Outcome; 6] = [
        Outcome::Refused,
        Outcome::Reset,
        Outcome::Timeout,
        Outcome::NotOk,
        Outcome::Short,
        Outcome::Other,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Refused => "refused",
            Outcome::Reset => "reset",
            Outcome::Timeout => "timed out",
            Outcome::NotOk => "not 200",
            Outcome::Short => "short answer",
            Outcome::Other => "other error",
        }
    }
}

/// One request as a client saw it. Times are nanoseconds since the run's
/// epoch (one `Instant` shared by every thread).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// Just before `connect`.
    pub start: u64,
    /// When the answer had ended (or the request failed).
    pub end: u64,
    pub outcome: Outcome,
    /// The pid in the answer's body (the server process that answered); 0
    /// when it failed.
    pub pid: u32,
}

impl Request {
    pub fn latency(&self) -> u64 {
        self.end.saturating_sub(self.start)
    }

    pub fn ok(&self) -> bool {
        self.outcome == Outcome::Ok
    }

    /// Whether the request was in flight at some moment of `span`.
    pub fn overlaps(&self, span: Span) -> bool {
        self.start <= span.end && self.end >= span.start
    }
}

/// A span of time, both ends included, in nanoseconds since the epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    pub start: u64,
    pub end: u64,
}

impl Span {
    pub fn len(&self) -> u64 {
        self.end.saturating_sub(self.start)
    }
}

/// Which part of a run a request belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Started before the steady state: not counted in any latency figure.
    Warmup,
    /// Started within the steady-state phase (no reload anywhere near).
    Steady,
    /// In flight at some moment of reload window `i`: from the moment the
    /// reload (or the naive stop) was asked for until the old server has
    /// exited and the new one has answered a request.
    Reload(usize),
    /// Started in the reloading phase, in flight during no window.
    Between,
}

/// Classifies a request. A request in flight during a reload window is in
/// that window whatever its start (the first window, if it spans two),
/// since it is one a reload could have delayed or broken; otherwise its
/// start decides.
pub fn classify(r: &Request, steady: Span, windows: &[Span]) -> Phase {
    if let Some(i) = windows.iter().position(|w| r.overlaps(*w)) {
        return Phase::Reload(i);
    }
    if r.start < steady.start {
        Phase::Warmup
    } else if r.start <= steady.end {
        Phase::Steady
    } else {
        Phase::Between
    }
}

/// The end of a reload window that began at `start`: the later of the old
/// server's exit and the end of the first successful answer from another
/// server process (pid other than `old_pid`) that began after `start`.
/// `None` if no other process answered after `start`.
pub fn window_end(requests: &[Request], start: u64, old_pid: u32, old_exited: u64) -> Option<u64> {
    let first_new = requests
        .iter()
        .filter(|r| r.ok() && r.pid != old_pid && r.start >= start)
        .map(|r| r.end)
        .min()?;
    Some(first_new.max(old_exited))
}

/// The `per_mille`-th per-mille of `sorted` (ascending) by the nearest-rank
/// method: the smallest value with at least that share of the values at or
/// below it. 500 is the median, 990 the p99, 1000 the maximum. `None` for
/// no values.
pub fn percentile(sorted: &[u64], per_mille: u64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let n = sorted.len() as u64;
    // ceil(n * p / 1000) in integers, at least rank 1.
    let rank = (n * per_mille).div_ceil(1000).max(1);
    Some(sorted[(rank - 1).min(n - 1) as usize])
}

/// Latency figures over a set of successful requests, in microseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Latencies {
    pub count: usize,
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
}

impl Latencies {
    /// From the latencies of successful requests, in nanoseconds (sorted
    /// here).
    pub fn of(mut nanos: Vec<u64>) -> Latencies {
        nanos.sort_unstable();
        let us = |p| percentile(&nanos, p).map_or(0.0, |v| v as f64 / 1e3);
        Latencies {
            count: nanos.len(),
            p50_us: us(500),
            p99_us: us(990),
            max_us: us(1000),
        }
    }
}

/// For each window, how long requests kept failing in it: from the start
/// of the first failed request overlapping it to the end of the last one,
/// 0 when none failed. Nanoseconds.
pub fn failing_spans(requests: &[Request], windows: &[Span]) -> Vec<u64> {
    windows
        .iter()
        .map(|w| {
            let failed = requests.iter().filter(|r| !r.ok() && r.overlaps(*w));
            let (first, last) =
                failed.fold((u64::MAX, 0), |(a, b), r| (a.min(r.start), b.max(r.end)));
            last.saturating_sub(first)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(start: u64, end: u64, outcome: Outcome, pid: u32) -> Request {
        Request {
            start,
            end,
            outcome,
            pid,
        }
    }

    #[test]
    fn percentiles_by_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 500), Some(50));
        assert_eq!(percentile(&v, 990), Some(99));
        assert_eq!(percentile(&v, 1000), Some(100));
        assert_eq!(percentile(&v, 0), Some(1));
        assert_eq!(percentile(&[7], 990), Some(7));
        assert_eq!(percentile(&[1, 2, 3], 500), Some(2));
        // 1000 values: the p99 is the 990th, so 10 values lie above it.
        let v: Vec<u64> = (1..=1000).collect();
        assert_eq!(percentile(&v, 990), Some(990));
        // 150 values: rank ceil(148.5) = 149.
        let v: Vec<u64> = (1..=150).collect();
        assert_eq!(percentile(&v, 990), Some(149));
        assert_eq!(percentile(&[], 500), None);
        let l = Latencies::of(vec![3000, 1000, 2000]);
        assert_eq!((l.count, l.p50_us, l.max_us), (3, 2.0, 3.0));
    }

    #[test]
    fn phases() {
        let steady = Span {
            start: 100,
            end: 200,
        };
        let windows = [
            Span {
                start: 300,
                end: 350,
            },
            Span {
                start: 500,
                end: 520,
            },
        ];
        let c = |s, e| classify(&req(s, e, Outcome::Ok, 1), steady, &windows);
        assert_eq!(c(10, 20), Phase::Warmup);
        assert_eq!(c(90, 120), Phase::Warmup);
        assert_eq!(c(100, 150), Phase::Steady);
        assert_eq!(c(200, 260), Phase::Steady);
        assert_eq!(c(210, 260), Phase::Between);
        // In flight when the window opens, though it started before.
        assert_eq!(c(290, 300), Phase::Reload(0));
        assert_eq!(c(320, 330), Phase::Reload(0));
        // Ended after the window closed, started inside it.
        assert_eq!(c(350, 900), Phase::Reload(0));
        assert_eq!(c(351, 400), Phase::Between);
        // Spanning both windows: the first.
        assert_eq!(c(340, 510), Phase::Reload(0));
        assert_eq!(c(400, 501), Phase::Reload(1));
        assert_eq!(c(521, 530), Phase::Between);
    }

    #[test]
    fn windows_end_when_the_old_is_gone_and_the_new_has_answered() {
        let rs = [
            req(0, 10, Outcome::Ok, 1),
            req(95, 130, Outcome::Ok, 1), // the old one, still serving
            req(100, 105, Outcome::Refused, 0),
            req(99, 120, Outcome::Ok, 2), // began before the window
            req(110, 140, Outcome::Ok, 2),
            req(112, 135, Outcome::Ok, 2),
            req(115, 125, Outcome::Short, 2),
        ];
        // The new one first answered at 135; the old one exited at 150.
        assert_eq!(window_end(&rs, 100, 1, 150), Some(150));
        // ... or at 20 (a naive stop: old gone first, the new one later).
        assert_eq!(window_end(&rs, 100, 1, 20), Some(135));
        assert_eq!(window_end(&rs, 200, 1, 210), None);
        assert_eq!(window_end(&rs, 100, 2, 150), None);
        let spans = failing_spans(
            &rs,
            &[
                Span {
                    start: 100,
                    end: 150,
                },
                Span { start: 0, end: 10 },
            ],
        );
        assert_eq!(spans, [25, 0]);
    }
}
