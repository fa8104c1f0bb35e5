//! Following a run until every target has a result: a live progress bar on a terminal
//! (done/total, failures, rate, ETA; Ctrl-C asks whether to pause the run), plain lines
//! without escape codes anywhere else.
use crate::util::{Call, exit, fail, merge_patch};
use console::style;
use guestcred_api::{
    GuestPasswordReset, KeypairRebuild, Phase, RunStatus, TargetState, TargetStatus,
};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use kube::core::NamespaceResourceScope;
use kube::{Api, Resource};
use serde::de::DeserializeOwned;
use std::collections::BTreeSet;
use std::fmt::Debug;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// Either kind, through its run status.
pub trait RunObject:
    Resource<DynamicType = (), Scope = NamespaceResourceScope> + Clone + Debug + DeserializeOwned
{
    /// `guestpasswordresets.guestcred.io` (for messages and RBAC hints).
    const RESOURCE: &'static str;
    /// `gpr` / `kpr` (for commands printed to the user).
    const SHORT: &'static str;
    fn run(&self) -> Option<&RunStatus>;
}

impl RunObject for GuestPasswordReset {
    const RESOURCE: &'static str = crate::util::RESETS;
    const SHORT: &'static str = "gpr";
    fn run(&self) -> Option<&RunStatus> {
        self.status.as_ref().map(|s| &s.run)
    }
}

impl RunObject for KeypairRebuild {
    const RESOURCE: &'static str = crate::util::REBUILDS;
    const SHORT: &'static str = "kpr";
    fn run(&self) -> Option<&RunStatus> {
        self.status.as_ref().map(|s| &s.run)
    }
}

/// True when the terminal gets the live view (stderr is a terminal and TERM is not dumb).
pub fn interactive() -> bool {
    std::io::stderr().is_terminal() && std::env::var("TERM").map_or(true, |t| t != "dumb")
}

/// Colours only on a terminal (and never with NO_COLOR).
pub fn init_colours() {
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    console::set_colors_enabled(std::io::stdout().is_terminal() && !no_color);
    console::set_colors_enabled_stderr(std::io::stderr().is_terminal() && !no_color);
}

/// How a followed run ended.
pub enum Outcome {
    /// Every target has a result (the run's phase is terminal).
    Finished(Box<RunStatus>),
    /// The run cannot go on without a change: the Stalled condition's reason and message.
    Stalled { reason: String, message: String },
    /// `--timeout` passed first.
    TimedOut,
    /// The user paused the run with Ctrl-C.
    Paused,
}

enum View {
    Bar(ProgressBar),
    Plain { last: String },
}

impl View {
    fn line(&self, text: &str) {
        match self {
            View::Bar(pb) => pb.suspend(|| println!("{text}")),
            View::Plain { .. } => println!("{text}"),
        }
    }
}

/// One target's result, as a line.
pub fn target_line(t: &TargetStatus) -> String {
    let reason = t.reason.as_deref().unwrap_or("-");
    let node = t.node.as_deref().unwrap_or("-");
    let attempts = match t.attempts {
        1 => "1 attempt".to_string(),
        n => format!("{n} attempts"),
    };
    let msg = match (t.state, t.message.as_deref()) {
        (TargetState::Succeeded, _) | (_, None) => String::new(),
        (_, Some(m)) => format!(": {m}"),
    };
    let (mark, state) = match t.state {
        TargetState::Succeeded => (style("✔").green(), style(format!("{:?}", t.state)).green()),
        TargetState::Failed => (style("✘").red(), style(format!("{:?}", t.state)).red()),
        _ => (
            style("-").yellow(),
            style(format!("{:?}", t.state)).yellow(),
        ),
    };
    if console::colors_enabled() {
        format!(
            "{mark} {} {state} {} on {node} after {attempts}{msg}",
            style(&t.vm).bold(),
            style(reason).bold()
        )
    } else {
        format!(
            "{}: {:?} ({reason}) on {node} after {attempts}{msg}",
            t.vm, t.state
        )
    }
}

/// Follow `name` until it finishes, stalls, `timeout` passes or (on a terminal) the user
/// pauses it.
pub async fn follow<K: RunObject>(
    api: &Api<K>,
    ns: &str,
    name: &str,
    timeout: Duration,
) -> anyhow::Result<Outcome> {
    let call = Call {
        verb: "get",
        resource: K::RESOURCE,
        namespace: ns,
    };
    let interactive = interactive();
    let view = if interactive {
        let pb = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
        pb.set_style(
            ProgressStyle::with_template(
                "{spinner:.cyan} {prefix:.bold} [{bar:30.cyan/blue}] {pos}/{len} VMs  {msg}  {per_sec}  ETA {eta}",
            )
            .expect("a valid template")
            .progress_chars("=> "),
        );
        pb.set_prefix(name.to_string());
        pb.enable_steady_tick(Duration::from_millis(120));
        View::Bar(pb)
    } else {
        View::Plain {
            last: String::new(),
        }
    };
    let mut view = view;
    let start = Instant::now();
    let mut reported: BTreeSet<String> = BTreeSet::new();
    let mut hinted = false;
    let mut interrupt = Box::pin(tokio::signal::ctrl_c());
    loop {
        let obj = api.get(name).await.map_err(|e| call.error(e))?;
        let generation = obj.meta().generation;
        if let Some(run) = obj.run() {
            let current = run.observed_generation == generation;
            let s = &run.summary;
            let done = u64::from(s.succeeded + s.failed + s.skipped);
            let failed = s.failed + s.skipped;
            for t in &run.targets {
                if t.state.is_terminal() && current && reported.insert(t.vm.clone()) {
                    view.line(&target_line(t));
                }
            }
            match &mut view {
                View::Bar(pb) => {
                    pb.set_length(u64::from(s.total));
                    pb.set_position(done);
                    let f = format!("{failed} failed");
                    pb.set_message(if failed > 0 {
                        style(f).red().to_string()
                    } else {
                        f
                    });
                }
                View::Plain { last } => {
                    let phase = run.phase.map_or("Pending".into(), |p| format!("{p:?}"));
                    let line = format!(
                        "{}/{name}: {phase}, {done}/{} done, {failed} failed",
                        K::SHORT,
                        s.total
                    );
                    if current && *last != line {
                        eprintln!("{line}");
                        *last = line;
                    }
                }
            }
            if current
                && matches!(
                    run.phase,
                    Some(Phase::Succeeded | Phase::Failed | Phase::PartiallySucceeded)
                )
            {
                finish(&view);
                return Ok(Outcome::Finished(Box::new(run.clone())));
            }
            if let Some(c) = run.conditions.iter().find(|c| {
                c.type_ == guestcred_api::conditions::STALLED
                    && c.status == "True"
                    && c.observed_generation == generation
            }) && current
            {
                finish(&view);
                return Ok(Outcome::Stalled {
                    reason: c.reason.clone(),
                    message: c.message.clone(),
                });
            }
        } else if !hinted && start.elapsed() > Duration::from_secs(20) {
            hinted = true;
            view.line(&format!(
                "{}/{name} has no status yet: is the guestcred controller running?",
                K::SHORT
            ));
        }
        if start.elapsed() > timeout {
            finish(&view);
            return Ok(Outcome::TimedOut);
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            _ = &mut interrupt, if interactive => {
                if let View::Bar(pb) = &view {
                    pb.disable_steady_tick();
                }
                if ask_pause::<K>(name).await? {
                    let pause = serde_json::json!({"spec": {"paused": true}});
                    merge_patch(api, name, pause, call).await?;
                    finish(&view);
                    return Ok(Outcome::Paused);
                }
                if let View::Bar(pb) = &view {
                    pb.enable_steady_tick(Duration::from_millis(120));
                }
                interrupt = Box::pin(tokio::signal::ctrl_c());
            }
        }
    }
}

fn finish(view: &View) {
    if let View::Bar(pb) = view {
        pb.finish_and_clear();
    }
}

/// Asks on the terminal whether to pause the run; a second Ctrl-C leaves without pausing.
async fn ask_pause<K: RunObject>(name: &str) -> anyhow::Result<bool> {
    eprint!(
        "\n{} {}/{name}? VMs in flight finish, no new ones start. [y/N] ",
        style("Pause").yellow().bold(),
        K::SHORT
    );
    let answer = tokio::task::spawn_blocking(|| {
        use std::io::BufRead;
        let mut line = String::new();
        match std::fs::File::open("/dev/tty") {
            Ok(tty) => std::io::BufReader::new(tty)
                .read_line(&mut line)
                .map(|_| line),
            Err(_) => std::io::stdin().lock().read_line(&mut line).map(|_| line),
        }
    });
    tokio::select! {
        a = answer => Ok(a??.trim().eq_ignore_ascii_case("y")),
        _ = tokio::signal::ctrl_c() => {
            eprintln!();
            Err(fail(exit::INTERRUPTED, format!("interrupted; {}/{name} goes on", K::SHORT)))
        }
    }
}

/// The exit of a followed run: Ok when every target succeeded, else an error naming each
/// failed target's reason and message.
pub fn conclude<K: RunObject>(name: &str, outcome: Outcome) -> anyhow::Result<()> {
    let short = K::SHORT;
    match outcome {
        Outcome::Finished(run) => {
            let s = &run.summary;
            if run.phase == Some(Phase::Succeeded) {
                println!(
                    "{short}/{name}: {} ({}/{} VMs)",
                    style("Succeeded").green(),
                    s.succeeded,
                    s.total
                );
                return Ok(());
            }
            let failures: Vec<String> = run
                .targets
                .iter()
                .filter(|t| matches!(t.state, TargetState::Failed | TargetState::Skipped))
                .map(|t| {
                    format!(
                        "  {}: {} {}",
                        t.vm,
                        t.reason.as_deref().unwrap_or("Failed"),
                        t.message.as_deref().unwrap_or("")
                    )
                })
                .collect();
            Err(fail(
                exit::FAILED,
                format!(
                    "{short}/{name}: {:?}, {} of {} VMs failed or skipped:\n{}",
                    run.phase.unwrap_or(Phase::Failed),
                    s.failed + s.skipped,
                    s.total,
                    failures.join("\n")
                ),
            ))
        }
        Outcome::Stalled { reason, message } => Err(fail(
            exit::FAILED,
            format!("{short}/{name} is stalled: {reason}: {message}"),
        )),
        Outcome::TimedOut => Err(fail(
            exit::TIMEOUT,
            format!(
                "timed out following {short}/{name}; it goes on (see `kubectl guestcred status {name}`)"
            ),
        )),
        Outcome::Paused => Err(fail(
            exit::INTERRUPTED,
            format!(
                "{short}/{name} paused; resume with: kubectl patch {short} {name} --type merge -p '{{\"spec\":{{\"paused\":false}}}}'"
            ),
        )),
    }
}
