//! Training progress: an indicatif bar on a terminal, periodic plain lines elsewhere (CI logs,
//! files), where a redrawn bar would only be noise.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

enum Output {
    Bar(ProgressBar),
    Lines { sink: Box<dyn Write + Send>, every: Duration, last: Option<Instant> },
}

/// Shows step / total, loss, learning rate and iterations per second.
pub struct Progress {
    out: Output,
    label: String,
    total: u64,
    /// The step this process started from (a resumed run does not count earlier steps in it/s).
    first: u64,
    start: Instant,
    step: u64,
}

impl std::fmt::Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Progress")
            .field("label", &self.label)
            .field("step", &self.step)
            .field("total", &self.total)
            .finish()
    }
}

impl Progress {
    /// A bar on stdout when it is a terminal, else a plain line on stdout every 10 seconds.
    /// `start` is the step the run resumes from (0 for a fresh run).
    pub fn new(label: &str, start: u64, total: u64) -> Self {
        if std::io::stdout().is_terminal() {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stdout());
            if let Ok(style) = ProgressStyle::with_template(
                "{prefix} [{elapsed_precise}] {wide_bar} {pos}/{len} eta {eta} {msg}",
            ) {
                bar.set_style(style);
            }
            bar.set_prefix(label.to_string());
            bar.set_position(start);
            Self::with_output(Output::Bar(bar), label, start, total)
        } else {
            Self::lines(label, start, total, Box::new(std::io::stdout()), Duration::from_secs(10))
        }
    }

    /// Plain lines into `sink`, at most one per `every` (plus the first and the last step).
    pub fn lines(
        label: &str,
        start: u64,
        total: u64,
        sink: Box<dyn Write + Send>,
        every: Duration,
    ) -> Self {
        Self::with_output(Output::Lines { sink, every, last: None }, label, start, total)
    }

    fn with_output(out: Output, label: &str, start: u64, total: u64) -> Self {
        let label = label.to_string();
        Self { out, label, total, first: start, start: Instant::now(), step: start }
    }

    /// Steps per second in this process so far.
    pub fn rate(&self) -> f64 {
        let secs = self.start.elapsed().as_secs_f64();
        if secs > 0.0 { (self.step - self.first) as f64 / secs } else { 0.0 }
    }

    /// Records that `step` steps are complete, with the last loss and learning rate.
    pub fn update(&mut self, step: u64, loss: f64, lr: f64) {
        self.step = step.max(self.first);
        let msg = format!("loss {loss:.4e} lr {lr:.2e} {:.2} it/s", self.rate());
        let (total, label, done) = (self.total, self.label.clone(), step >= self.total);
        match &mut self.out {
            Output::Bar(bar) => {
                bar.set_position(step);
                bar.set_message(msg);
            }
            Output::Lines { sink, every, last } => {
                let due = last.is_none_or(|t| t.elapsed() >= *every) || done;
                if due {
                    let pct = if total > 0 { 100.0 * step as f64 / total as f64 } else { 100.0 };
                    let _ = writeln!(sink, "{label} step {step}/{total} ({pct:.0}%) {msg}");
                    let _ = sink.flush();
                    *last = Some(Instant::now());
                }
            }
        }
    }

    /// A message line that does not disturb the bar (checkpoints saved, evaluations, ...).
    pub fn println(&mut self, line: &str) {
        match &mut self.out {
            Output::Bar(bar) => bar.println(line),
            Output::Lines { sink, .. } => {
                let _ = writeln!(sink, "{line}");
                let _ = sink.flush();
            }
        }
    }

    /// Leaves the bar (or a last line) showing the final state.
    pub fn finish(&mut self) {
        if let Output::Bar(bar) = &self.out {
            bar.finish();
        }
    }
}
