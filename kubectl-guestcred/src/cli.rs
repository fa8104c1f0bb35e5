//! The command line: `kubectl guestcred <command>`, with help laid out like kubectl's
//! (summary, description, Examples, Options, Usage).
use clap::{ArgGroup, Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::time::Duration;

/// kubectl's help layout: description, Examples, Options, then Usage.
const TEMPLATE: &str = "\
{about-with-newline}{after-help}
{all-args}

Usage:
  {usage}
";

const ROOT_EXAMPLES: &str = "\
Examples:
  # Set root's password in VM db-0 from a prompt (the input is not echoed)
  kubectl guestcred set-password db-0 --stdin

  # Generate a password for user alice in every VM labelled tier=db, 5 at a time
  kubectl guestcred set-password -l tier=db --user alice --generate --max-concurrency 5

  # Show the generated password of VM db-0
  kubectl guestcred show-password db-0-pw-x7k2q

  # Add an SSH key for cloud-user to VM web-0, removed again after one hour
  kubectl guestcred add-key web-0 --user cloud-user -f ~/.ssh/id_ed25519.pub --ttl 1h

  # List cloud-user's keys in VM web-0 as the guest has them, and which guestcred manages
  kubectl guestcred list-keys web-0 --user cloud-user

  # Remove one of them by fingerprint
  kubectl guestcred remove-key web-0 --user cloud-user --fingerprint SHA256:uN0vG3+VJqYV1kx5bQ4AqS0N+2GXKwVzhpnBsHk0v3M

  # Show every reset and key rebuild in the namespace, one line per VM
  kubectl guestcred status
";

#[derive(Debug, Parser)]
#[command(
    name = "kubectl-guestcred",
    bin_name = "kubectl guestcred",
    version,
    about = "Reset guest passwords and manage SSH keys in running VMs through guestcred.",
    long_about = "Reset guest passwords and manage SSH keys in running VMs through guestcred.

 Each command creates a GuestPasswordReset or KeypairRebuild object, exactly as `kubectl \
apply` of the same YAML would, and follows it until every targeted VM has a result. The \
plugin talks only to the Kubernetes API server, with your kubeconfig and your permissions.",
    help_template = TEMPLATE,
    after_help = ROOT_EXAMPLES,
    subcommand_help_heading = "Commands",
    disable_help_subcommand = true,
    propagate_version = true
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

/// How to reach the cluster: the same flags and environment as kubectl.
#[derive(Debug, Clone, Default, Args)]
#[command(next_help_heading = "Global Options")]
pub struct Global {
    /// Path to the kubeconfig file to use (default: $KUBECONFIG, else ~/.kube/config).
    #[arg(long, global = true, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// The name of the kubeconfig context to use.
    #[arg(long, global = true, value_name = "NAME")]
    pub context: Option<String>,
    /// The namespace scope for this request (default: the context's namespace).
    #[arg(short = 'n', long, global = true, value_name = "NAMESPACE")]
    pub namespace: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    SetPassword(SetPassword),
    Status(Status),
    ShowPassword(ShowPassword),
    Rotate(Rotate),
    AddKey(AddKey),
    RemoveKey(RemoveKey),
    ListKeys(ListKeys),
    Completion(Completion),
}

/// Output formats of `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum Output {
    #[default]
    Table,
    Json,
    Yaml,
}

/// Whether to follow the created object until it finishes.
#[derive(Debug, Clone, Args)]
pub struct Follow {
    /// Follow the run until every VM has a result (the default).
    #[arg(long, overrides_with = "no_wait")]
    pub wait: bool,
    /// Create the object and return at once.
    #[arg(long)]
    pub no_wait: bool,
    /// Give up following after this long (e.g. 90s, 5m, 1h); the run itself goes on.
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = parse_duration)]
    pub timeout: std::time::Duration,
}

impl Follow {
    pub fn enabled(&self) -> bool {
        !self.no_wait
    }
}

/// Concurrency, failure budget and deadline of a run.
#[derive(Debug, Clone, Args)]
pub struct Rollout {
    /// At most this many VMs are changed at once (1-1000).
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub max_concurrency: u32,
    /// Stop starting new VMs once this many have failed.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub max_failures: u32,
    /// How long each VM may take before it fails with DeadlineExceeded (10s-24h).
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = parse_duration)]
    pub deadline: std::time::Duration,
}

/// Which VMs a command changes (one by name, or every running VM a selector matches), how
/// many at once, and whether only to list them: shared by set-password, add-key and
/// remove-key.
#[derive(Debug, Clone, Args)]
#[command(group(ArgGroup::new("vm_or_selector").required(true).args(["vm", "selector"])))]
pub struct Targets {
    /// The VirtualMachineInstance to change.
    pub vm: Option<String>,
    /// Change every running VM whose labels match this selector (e.g. tier=db,env!=prod).
    #[arg(short = 'l', long, value_name = "SELECTOR")]
    pub selector: Option<String>,
    /// Show what would be done (the VMs that would be targeted and their nodes) and change
    /// nothing.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub rollout: Rollout,
}

const SET_PASSWORD_EXAMPLES: &str = "\
Examples:
  # Read the new password from a prompt (not echoed) or a pipe; it is stored in a Secret
  # owned by the reset and never passes through the command line
  kubectl guestcred set-password db-0 --user root --stdin
  printf %s \"$PW\" | kubectl guestcred set-password db-0 --stdin

  # Generate a 32-character password and show it afterwards
  kubectl guestcred set-password db-0 --generate --length 32
  kubectl guestcred show-password <reset-name>

  # Use a password (or crypt(3) hash) already in Secret db-root, key password
  kubectl guestcred set-password db-0 --from-secret db-root/password --crypted

  # List the VMs a selector would reach, and their nodes, without changing anything
  kubectl guestcred set-password -l tier=db --generate --dry-run

  # Every VM labelled tier=db, 5 at a time, stopping after 2 failures
  kubectl guestcred set-password -l tier=db --generate --max-concurrency 5 --max-failures 2
";

/// Set a guest user's password in one VM or in every VM matching a selector.
#[derive(Debug, Args)]
#[command(
    about = "Set a guest user's password in a running VM, or in every VM matching a selector.",
    long_about = "Set a guest user's password in a running VM, or in every VM matching a selector.

 Creates a GuestPasswordReset named <vm>-pw-<random> and follows it until every targeted \
VM has a result. Exits 0 when every VM succeeded; otherwise it prints each failed VM's \
reason and message and exits 1 (3 when --timeout passes first; the run goes on).

 With --stdin the value is read from standard input (from a terminal, without echo). The \
reset is created paused, then a Secret owned by it receives the value, then the reset is \
unpaused: the value never appears in a process argument, a log or the terminal.",
    help_template = TEMPLATE,
    after_help = SET_PASSWORD_EXAMPLES,
    override_usage = "kubectl guestcred set-password (VM | -l SELECTOR) (--generate [--length N] | --from-secret NAME[/KEY] | --stdin) [--crypted] [options]",
    group(ArgGroup::new("source").required(true).args(["generate", "from_secret", "stdin"])),
)]
pub struct SetPassword {
    #[command(flatten)]
    pub targets: Targets,
    /// Guest user (default: the VM's guestcred.io/admin-user annotation, else root, or
    /// Administrator on Windows).
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,
    /// Generate a random password per VM (stored in a Secret owned by the reset).
    #[arg(long)]
    pub generate: bool,
    /// Length of generated passwords (16-128).
    #[arg(long, value_name = "N", default_value_t = 24, requires = "generate")]
    pub length: u32,
    /// Seal generated passwords to this age recipient (`age1…`, as age-keygen prints it):
    /// their Secrets hold only the ciphertext; show-password --identity decrypts it.
    #[arg(long, value_name = "AGE_RECIPIENT", requires = "generate")]
    pub seal_to: Option<String>,
    /// Use a password already in a Secret of this namespace: NAME or NAME/KEY (key
    /// default: password).
    #[arg(long, value_name = "NAME[/KEY]")]
    pub from_secret: Option<String>,
    /// Read the password from standard input.
    #[arg(long)]
    pub stdin: bool,
    /// The value is a crypt(3) hash (e.g. $6$...), set verbatim.
    #[arg(long, conflicts_with = "generate")]
    pub crypted: bool,
    #[command(flatten)]
    pub follow: Follow,
}

const STATUS_EXAMPLES: &str = "\
Examples:
  # Every reset and key rebuild in the current namespace, one line per VM
  kubectl guestcred status

  # One object, as YAML
  kubectl guestcred status db-0-pw-x7k2q -o yaml

  # Objects carrying a label
  kubectl guestcred status -l team=dba
";

/// Show per-VM results of resets and key rebuilds.
#[derive(Debug, Args)]
#[command(
    about = "Show the per-VM state of password resets and key rebuilds.",
    long_about = "Show the per-VM state of password resets and key rebuilds.

 One line per targeted VM: its state, reason, attempts and node; for key rebuilds also the \
delivery mode, the key fingerprints and when the keys expire. Without a name, every \
GuestPasswordReset and KeypairRebuild in the namespace is shown.",
    help_template = TEMPLATE,
    after_help = STATUS_EXAMPLES,
)]
pub struct Status {
    /// A GuestPasswordReset or KeypairRebuild name.
    #[arg(conflicts_with = "selector")]
    pub name: Option<String>,
    /// Only objects whose labels match this selector.
    #[arg(short = 'l', long, value_name = "SELECTOR")]
    pub selector: Option<String>,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

const SHOW_PASSWORD_EXAMPLES: &str = "\
Examples:
  # The generated password of the only VM of a reset
  kubectl guestcred show-password db-0-pw-x7k2q

  # One VM of a bulk reset
  kubectl guestcred show-password bulk-pw-4mz8d --vm db-3

  # Into a file (not a terminal): --force is required
  kubectl guestcred show-password db-0-pw-x7k2q --force > pw.txt

  # A sealed password (generate.sealTo.age): decrypted here with your age identity
  kubectl guestcred show-password db-0-pw-x7k2q --identity ~/.config/age/key.txt
";

/// Print a generated password.
#[derive(Debug, Args)]
#[command(
    about = "Print a password that a reset generated.",
    long_about = "Print a password that a reset generated.

 Reads the Secret named in the target's status.outputSecret. The password is printed once, \
to a terminal; to print it into a pipe or a file, add --force. A sealed password \
(spec.password.generate.sealTo.age) is stored only as an age ciphertext: it is decrypted \
here, locally, with the identity file given by --identity (as age-keygen writes it); the \
identity never leaves this machine.",
    help_template = TEMPLATE,
    after_help = SHOW_PASSWORD_EXAMPLES,
)]
pub struct ShowPassword {
    /// The GuestPasswordReset.
    pub reset: String,
    /// The VM, when the reset has more than one.
    #[arg(long, value_name = "VM")]
    pub vm: Option<String>,
    /// Print even when standard output is not a terminal.
    #[arg(long)]
    pub force: bool,
    /// age identity file (as age-keygen writes it) to decrypt a sealed password with.
    #[arg(short = 'i', long, value_name = "FILE")]
    pub identity: Option<std::path::PathBuf>,
}

const ROTATE_EXAMPLES: &str = "\
Examples:
  # Give every VM of reset db-fleet a new generated password now, and wait for it
  kubectl guestcred rotate db-fleet

  # Ask for it and return at once
  kubectl guestcred rotate db-fleet --no-wait
";

/// Rotate a reset's generated passwords now.
#[derive(Debug, Args)]
#[command(
    about = "Rotate a reset's generated passwords now.",
    long_about = "Rotate a reset's generated passwords now.

 Sets the annotation guestcred.io/rotate-now on the GuestPasswordReset to a new value: the \
controller starts a new run that generates a new password for every VM, stores each in a \
Secret of its own before it sets it, and (with spec.rotation) prunes the older Secrets \
beyond keepPrevious. Works with or without spec.rotation, for generated passwords only. \
Follows the new run until every VM has a result, unless --no-wait.",
    help_template = TEMPLATE,
    after_help = ROTATE_EXAMPLES,
)]
pub struct Rotate {
    /// The GuestPasswordReset.
    pub reset: String,
    #[command(flatten)]
    pub follow: Follow,
}

const ADD_KEY_EXAMPLES: &str = "\
Examples:
  # Add a key for cloud-user in VM web-0, live through the guest agent
  kubectl guestcred add-key web-0 --user cloud-user -f ~/.ssh/id_ed25519.pub

  # Add it for one hour only
  kubectl guestcred add-key web-0 --user cloud-user -f key.pub --ttl 1h

  # Replace the keys guestcred added for objects since deleted (keys added by hand stay)
  kubectl guestcred add-key web-0 --user cloud-user -f key.pub --replace

  # List the VMs a selector would reach, and their nodes, without changing anything
  kubectl guestcred add-key -l tier=web --user cloud-user -f key.pub --dry-run

  # Every VM labelled tier=web, 5 at a time, stopping after 2 failures
  kubectl guestcred add-key -l tier=web --user cloud-user -f key.pub --max-concurrency 5 --max-failures 2
";

/// Add SSH public keys to a guest user.
#[derive(Debug, Args)]
#[command(
    about = "Add SSH public keys to a guest user's authorized_keys in a running VM, or in every VM matching a selector.",
    long_about = "Add SSH public keys to a guest user's authorized_keys in a running VM, or in every VM matching a selector.

 Creates a KeypairRebuild named <vm>-key-<random> (bulk-key-<random> with -l) with the \
keys inline and follows it until every targeted VM has a result: the keys are added \
through the guest agent and read back (mode Auto falls back to a rebuild when the agent \
cannot edit keys). With --replace, keys guestcred added for KeypairRebuilds that no \
longer exist are removed; keys another KeypairRebuild still holds or grants stay (delete \
that object to remove them), and keys added by hand are never touched. Exits 0 when every VM succeeded; otherwise it prints \
each failed VM's reason and message and exits 1 (3 when --timeout passes first; the run \
goes on).",
    help_template = TEMPLATE,
    after_help = ADD_KEY_EXAMPLES,
    override_usage = "kubectl guestcred add-key (VM | -l SELECTOR) --user USER -f KEYFILE [--ttl DURATION] [--replace] [options]",
)]
pub struct AddKey {
    #[command(flatten)]
    pub targets: Targets,
    /// Guest user whose authorized_keys changes.
    #[arg(long, value_name = "USER", required = true)]
    pub user: String,
    /// File with public keys in authorized_keys format ('-' for standard input).
    #[arg(
        short = 'f',
        long = "filename",
        value_name = "KEYFILE",
        required = true
    )]
    pub file: PathBuf,
    /// Remove the keys again after this long (e.g. 30m, 1h; 10s to 365d).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub ttl: Option<std::time::Duration>,
    /// Remove keys guestcred added for objects that no longer exist (Replace); default:
    /// only add (Append).
    #[arg(long)]
    pub replace: bool,
    /// How the keys reach the guest.
    #[arg(long, value_enum, default_value_t = Mode::Auto)]
    pub mode: Mode,
    #[command(flatten)]
    pub follow: Follow,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Live when the agent can edit keys, else Rebuild.
    Auto,
    /// Through the guest agent only.
    Live,
}

const REMOVE_KEY_EXAMPLES: &str = "\
Examples:
  # Remove the key with this fingerprint from cloud-user's authorized_keys in VM web-0
  kubectl guestcred remove-key web-0 --user cloud-user --fingerprint SHA256:uN0vG3+VJqYV1kx5bQ4AqS0N+2GXKwVzhpnBsHk0v3M

  # Two keys at once; find fingerprints with list-keys, or ssh-keygen -lf KEYFILE
  kubectl guestcred list-keys web-0 --user cloud-user
  kubectl guestcred remove-key web-0 --user cloud-user --fingerprint SHA256:... --fingerprint SHA256:...

  # From every VM labelled tier=web, 5 at a time (a VM without the key fails with KeyNotFound)
  kubectl guestcred remove-key -l tier=web --user cloud-user --fingerprint SHA256:... --max-concurrency 5

  # List the VMs a selector would reach, and their nodes, without changing anything
  kubectl guestcred remove-key -l tier=web --user cloud-user --fingerprint SHA256:... --dry-run
";

/// Remove SSH keys by fingerprint.
#[derive(Debug, Args)]
#[command(
    about = "Remove SSH keys by fingerprint from a guest user's authorized_keys in a running VM, or in every VM matching a selector.",
    long_about = "Remove SSH keys by fingerprint from a guest user's authorized_keys in a running VM, or in every VM matching a selector.

 Creates a KeypairRebuild named <vm>-rmkey-<random> (bulk-rmkey-<random> with -l) with \
spec.removeFingerprints and follows it until every targeted VM has a result: every line \
of each named key is removed through the guest agent, and the keys are read back to \
verify they are gone. Naming a fingerprint is an explicit request: the key is removed \
whether guestcred added it or a person did. Nothing that is not named is touched. A VM \
whose guest user has no key with a named fingerprint is not changed at all and fails with \
reason KeyNotFound; the command then exits 1.",
    help_template = TEMPLATE,
    after_help = REMOVE_KEY_EXAMPLES,
    override_usage = "kubectl guestcred remove-key (VM | -l SELECTOR) --user USER --fingerprint SHA256:... [--fingerprint SHA256:...] [options]",
)]
pub struct RemoveKey {
    #[command(flatten)]
    pub targets: Targets,
    /// Guest user whose authorized_keys changes.
    #[arg(long, value_name = "USER", required = true)]
    pub user: String,
    /// SHA256 fingerprint of a key to remove, as ssh-keygen -lf prints it (repeatable).
    #[arg(long, value_name = "SHA256:...", required = true)]
    pub fingerprint: Vec<String>,
    #[command(flatten)]
    pub follow: Follow,
}

const LIST_KEYS_EXAMPLES: &str = "\
Examples:
  # cloud-user's keys in VM web-0, read from the guest
  kubectl guestcred list-keys web-0 --user cloud-user

  # The same as JSON (fingerprint, type, comment, managed, expiresAt per key)
  kubectl guestcred list-keys web-0 --user cloud-user -o json
";

/// List a guest user's keys as the guest has them.
#[derive(Debug, Args)]
#[command(
    about = "List a guest user's SSH keys as read from the guest.",
    long_about = "List a guest user's SSH keys as read from the guest.

 Creates a KeypairRebuild with mode Inspect, which reads the user's authorized_keys \
through the guest agent and changes nothing, waits for its report, prints it and deletes \
the object. One line per key: its SHA256 fingerprint, type and comment, whether guestcred \
manages it (added it; keys added by hand show no) and when a TTL removes it. At most 100 \
keys are listed; the rest are counted.

 One VM per command: mode Inspect takes a VM name only (no -l SELECTOR), because the keys \
of every VM a selector matches would not fit in one object's status. To look at several \
VMs, run it once per VM.",
    help_template = TEMPLATE,
    after_help = LIST_KEYS_EXAMPLES,
    override_usage = "kubectl guestcred list-keys VM --user USER [-o table|json|yaml] [options]",
)]
pub struct ListKeys {
    /// The VirtualMachineInstance (one; list-keys takes no selector).
    pub vm: String,
    /// Guest user whose authorized_keys is read.
    #[arg(long, value_name = "USER", required = true)]
    pub user: String,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// Give up waiting for the report after this long (e.g. 90s, 5m).
    #[arg(long, value_name = "DURATION", default_value = "2m", value_parser = parse_duration)]
    pub timeout: std::time::Duration,
}

/// Print a shell completion script.
#[derive(Debug, Args)]
#[command(
    about = "Print a shell completion script for kubectl-guestcred (bash, zsh or fish).",
    long_about = "Print a shell completion script for kubectl-guestcred (bash, zsh or fish).

 The script completes commands and flags of the kubectl-guestcred binary. For `kubectl \
guestcred ...` kubectl (1.26 or newer) itself asks the kubectl_complete-guestcred helper, \
installed beside the plugin, which also completes namespaces, VM names and resets from \
the cluster.",
    help_template = TEMPLATE,
    after_help = "Examples:\n  # Load completions in the current bash\n  source <(kubectl guestcred completion bash)\n\n  # zsh, permanently\n  kubectl guestcred completion zsh > \"${fpath[1]}/_kubectl-guestcred\"\n\n  # fish\n  kubectl guestcred completion fish > ~/.config/fish/completions/kubectl-guestcred.fish\n",
)]
pub struct Completion {
    #[arg(value_enum)]
    pub shell: Shell,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Shell {
    Bash,
    Zsh,
    Fish,
}

/// `90s`, `5m`, `1h`, `2d`, `1h30m` or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(n) = s.parse::<u64>() {
        return Ok(Duration::from_secs(n));
    }
    let mut total = 0u64;
    let mut num = String::new();
    for c in s.chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let n: u64 = num
            .parse()
            .map_err(|_| format!("invalid duration {s:?} (use e.g. 90s, 5m, 1h)"))?;
        num.clear();
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86400,
            _ => return Err(format!("invalid duration {s:?} (use e.g. 90s, 5m, 1h)")),
        };
        total = total.saturating_add(n.saturating_mul(unit));
    }
    if !num.is_empty() || s.is_empty() {
        return Err(format!("invalid duration {s:?} (use e.g. 90s, 5m, 1h)"));
    }
    Ok(Duration::from_secs(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(172800)));
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("5m3").is_err());
        assert!(parse_duration("").is_err());
    }
}
