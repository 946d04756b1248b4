//! Zero-loss rates (RFC 2544 throughput; FD.io CSIT's NDR/PDR search, simplified): the
//! highest offered rate a configuration forwards with no loss (NDR) and with at most 0.5%
//! (PDR), found by bisection in a bounded number of trials, configurations interleaved trial
//! by trial (the machine's speed drifts), the NDR's trial repeated before it is reported.
//! Loss is exact: the sinks count sequence numbers.

/// Loss allowed at the PDR, in percent.
pub const PDR_LOSS_PCT: f64 = 0.5;

/// What one trial at an offered rate gave.
#[derive(Debug, Clone, Copy, Default)]
pub struct Trial {
    /// Offered, frames a second (as sent, not as asked).
    pub offered: f64,
    /// Forwarded, frames a second.
    pub forwarded: f64,
    /// Lost, percent of offered.
    pub loss_pct: f64,
    /// Forwarder CPU, fraction of a core.
    pub cpu: f64,
    /// CPU of everything else on the machine during the trial, fraction of a core.
    pub other_cpu: f64,
}

/// One configuration's search.
#[derive(Debug, Clone, Default)]
pub struct Search {
    /// Highest rate that passed with no loss, and the lowest that lost.
    ndr: (f64, f64),
    /// The same for the PDR.
    pdr: (f64, f64),
    /// Every trial: (rate asked, what happened).
    pub trials: Vec<(f64, Trial)>,
    confirmed: bool,
}

impl Search {
    /// A search whose first trial was unpaced (`max`): its offered rate bounds everything.
    pub fn new(max: Trial) -> Self {
        let hi = max.offered.max(1.0);
        let mut s = Self { ndr: (0.0, hi * 1.0001), pdr: (0.0, hi * 1.0001), trials: Vec::new(), confirmed: false };
        s.record(0.0, max);
        s
    }

    /// Takes a trial at `rate` (0: unpaced) into the bounds.
    pub fn record(&mut self, rate: f64, t: Trial) {
        let at = if rate > 0.0 { rate.min(t.offered.max(rate * 0.98)) } else { t.offered };
        if t.loss_pct <= 0.0 {
            self.ndr.0 = self.ndr.0.max(at);
        } else {
            self.ndr.1 = self.ndr.1.min(at);
            self.ndr.0 = self.ndr.0.min(self.ndr.1);
        }
        if t.loss_pct <= PDR_LOSS_PCT {
            self.pdr.0 = self.pdr.0.max(at);
        } else {
            self.pdr.1 = self.pdr.1.min(at);
            self.pdr.0 = self.pdr.0.min(self.pdr.1);
        }
        self.trials.push((rate, t));
    }

    /// The next rate to try: the middle of the wider (relative) of the two intervals; `None`
    /// once both are within `precision` (a fraction) of their upper bound.
    pub fn next(&self, precision: f64) -> Option<f64> {
        let width = |(lo, hi): (f64, f64)| (hi - lo) / hi.max(1.0);
        let (wn, wp) = (width(self.ndr), width(self.pdr));
        if wn <= precision && wp <= precision {
            return None;
        }
        let (lo, hi) = if wn >= wp { self.ndr } else { self.pdr };
        Some(((lo + hi) / 2.0).max(1.0))
    }

    /// The rate to repeat before reporting (the NDR's), unless done.
    pub fn to_confirm(&self) -> Option<f64> {
        (!self.confirmed && self.ndr.0 > 0.0).then_some(self.ndr.0)
    }

    /// Takes the repeat: a loss there lowers the NDR to the highest rate below it that never
    /// lost.
    pub fn confirm(&mut self, rate: f64, t: Trial) {
        self.confirmed = true;
        let lost = t.loss_pct > 0.0;
        self.trials.push((rate, t));
        if lost {
            let below = self
                .trials
                .iter()
                .filter(|(r, x)| x.loss_pct <= 0.0 && *r > 0.0 && *r < rate)
                .map(|(r, _)| *r)
                .fold(0.0, f64::max);
            self.ndr = (below, rate);
        }
    }

    /// (NDR, PDR) in frames a second.
    pub fn result(&self) -> (f64, f64) {
        (self.ndr.0, self.pdr.0)
    }

    /// The unpaced trial.
    pub fn max(&self) -> Trial {
        self.trials.first().map(|t| t.1).unwrap_or_default()
    }
}

/// The machine's CPU time outside the given processes over a window: a snapshot to subtract.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    busy_ticks: u64,
    at: std::time::Instant,
}

fn busy_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<u64> =
        stat.lines().next().unwrap_or_default().split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal: busy is all but idle and iowait.
    f.iter().enumerate().filter(|(i, _)| *i != 3 && *i != 4 && *i < 8).map(|(_, v)| v).sum()
}

/// This process's CPU seconds (all threads).
pub fn self_cpu() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let t = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
    (t(11) + t(12)) as f64 / 100.0
}

impl Load {
    /// Now.
    pub fn start() -> Self {
        Self { busy_ticks: busy_ticks(), at: std::time::Instant::now() }
    }

    /// The CPU (fraction of a core) the machine spent since `start`, less `ours` seconds.
    pub fn other(&self, ours: f64) -> f64 {
        let busy = busy_ticks().saturating_sub(self.busy_ticks) as f64 / 100.0;
        ((busy - ours) / self.at.elapsed().as_secs_f64().max(1e-6)).max(0.0)
    }
}

/// The 1-minute load average.
pub fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg").ok().and_then(|s| s.split_whitespace().next()?.parse().ok()).unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trial(offered: f64, forwarded: f64) -> Trial {
        Trial { offered, forwarded, loss_pct: 100.0 * (offered - forwarded) / offered, ..Trial::default() }
    }

    #[test]
    fn the_search_closes_in_on_a_forwarder_that_drops_above_a_rate() {
        // A forwarder that passes everything up to 300 kpps and 1% more loss per 10 kpps above.
        let fwd = |rate: f64| if rate <= 300_000.0 { rate } else { rate * (1.0 - (rate - 300_000.0) / 1e6) };
        let mut s = Search::new(trial(500_000.0, fwd(500_000.0)));
        let mut n = 1;
        while let Some(r) = s.next(0.02) {
            s.record(r, trial(r, fwd(r)));
            n += 1;
            assert!(n < 20, "the search does not end");
        }
        if let Some(r) = s.to_confirm() {
            s.confirm(r, trial(r, fwd(r)));
        }
        let (ndr, pdr) = s.result();
        assert!((290_000.0..=300_000.0).contains(&ndr), "NDR {ndr}");
        assert!((300_000.0..=310_000.0).contains(&pdr), "PDR {pdr}");
        // A repeat that loses lowers the NDR.
        let mut s = Search::new(trial(500_000.0, 400_000.0));
        s.record(250_000.0, trial(250_000.0, 250_000.0));
        s.record(375_000.0, trial(375_000.0, 375_000.0));
        s.confirm(375_000.0, trial(375_000.0, 370_000.0));
        assert_eq!(s.result().0, 250_000.0);
    }
}
