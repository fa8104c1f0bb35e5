//! Talking to a lab guest's qemu-ga through libvirt. Lab verification only: product code
//! never uses guest-exec or reads /etc/shadow.
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};

use super::error::{LabError, codes};
use super::lookup;

/// Seconds libvirt waits for one agent reply (positive = seconds in
/// virDomainQemuAgentCommand).
const COMMAND_TIMEOUT_SECS: i32 = 30;
/// How long a guest-exec'd program may run.
const EXEC_TIMEOUT: Duration = Duration::from_secs(60);

/// Sends one agent command (`{"execute": ...}`) and returns its `return` value. The error
/// names only the command, never its arguments (which may be secrets).
pub fn agent_command(uri: &str, domain: &str, command: &Value) -> Result<Value, LabError> {
    let name = command
        .get("execute")
        .and_then(Value::as_str)
        .unwrap_or("?")
        .to_string();
    let (_conn, dom) = lookup(uri, domain)?;
    let reply = dom
        .qemu_agent_command(&command.to_string(), COMMAND_TIMEOUT_SECS, 0)
        .map_err(|e| LabError::libvirt(format!("{name} on {domain}"), &e))?;
    let mut parsed: Value = serde_json::from_str(&reply).map_err(|e| LabError::AgentReply {
        command: name.clone(),
        detail: format!("not JSON: {e}"),
    })?;
    match parsed.get_mut("return") {
        Some(ret) => Ok(ret.take()),
        None => Err(LabError::AgentReply {
            command: name,
            detail: "no \"return\" member".into(),
        }),
    }
}

/// guest-ping until the agent answers. Retries only while libvirt says the agent is not
/// connected or not responding (code 86); anything else (no domain, paused) fails at once.
pub fn wait_for_agent(uri: &str, domain: &str, timeout: Duration) -> Result<(), LabError> {
    let started = Instant::now();
    let deadline = started + timeout;
    loop {
        match agent_command(uri, domain, &json!({"execute": "guest-ping"})) {
            Ok(_) => {
                tracing::debug!(domain, elapsed = ?started.elapsed(), "agent answered");
                return Ok(());
            }
            Err(e) if e.libvirt_code() == Some(codes::AGENT_UNRESPONSIVE) => {
                if Instant::now() >= deadline {
                    return Err(LabError::Timeout {
                        what: format!("the agent of {domain} (last error: {e})"),
                        after: timeout,
                    });
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => return Err(e),
        }
    }
}

/// What a program run through guest-exec produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    pub exit_code: i64,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `argv` in the guest (guest-exec, then guest-exec-status until it exited).
/// `argv[0]` is looked up in the guest's PATH.
pub fn guest_exec(uri: &str, domain: &str, argv: &[&str]) -> Result<ExecOutput, LabError> {
    let Some((path, args)) = argv.split_first() else {
        return Err(LabError::Invalid("guest_exec needs a program".into()));
    };
    let started = agent_command(
        uri,
        domain,
        &json!({"execute": "guest-exec",
                "arguments": {"path": path, "arg": args, "capture-output": true}}),
    )?;
    let pid = started
        .get("pid")
        .and_then(Value::as_i64)
        .ok_or_else(|| LabError::AgentReply {
            command: "guest-exec".into(),
            detail: "no pid".into(),
        })?;
    let deadline = Instant::now() + EXEC_TIMEOUT;
    loop {
        let status = agent_command(
            uri,
            domain,
            &json!({"execute": "guest-exec-status", "arguments": {"pid": pid}}),
        )?;
        if status.get("exited").and_then(Value::as_bool) == Some(true) {
            return Ok(ExecOutput {
                // A program killed by a signal has no exitcode, only "signal".
                exit_code: status
                    .get("exitcode")
                    .and_then(Value::as_i64)
                    .unwrap_or_else(|| {
                        128 + status.get("signal").and_then(Value::as_i64).unwrap_or(0)
                    }),
                stdout: decode_data(&status, "out-data")?,
                stderr: decode_data(&status, "err-data")?,
            });
        }
        if Instant::now() >= deadline {
            return Err(LabError::Timeout {
                what: format!("{path} (guest pid {pid}) in {domain} to exit"),
                after: EXEC_TIMEOUT,
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn decode_data(status: &Value, field: &str) -> Result<String, LabError> {
    let Some(data) = status.get(field).and_then(Value::as_str) else {
        return Ok(String::new());
    };
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data)
        .map_err(|e| LabError::AgentReply {
            command: "guest-exec-status".into(),
            detail: format!("{field} is not base64: {e}"),
        })?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// The password hash field of `user` in the guest's /etc/shadow (e.g. `$y$j9T$…`, `*`).
pub fn shadow_entry(uri: &str, domain: &str, user: &str) -> Result<String, LabError> {
    let out = guest_exec(uri, domain, &["cat", "/etc/shadow"])?;
    if out.exit_code != 0 {
        return Err(LabError::AgentReply {
            command: "guest-exec cat /etc/shadow".into(),
            detail: format!("exit code {}", out.exit_code),
        });
    }
    parse_shadow_hash(&out.stdout, user)
        .ok_or_else(|| LabError::Invalid(format!("no user {user:?} in the guest's /etc/shadow")))
}

fn parse_shadow_hash(shadow: &str, user: &str) -> Option<String> {
    shadow.lines().find_map(|line| {
        let mut fields = line.split(':');
        (fields.next() == Some(user)).then(|| fields.next().unwrap_or_default().to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shadow_file() -> &'static str {
        "root:*:19000:0:99999:7:::\nalice:$y$j9T$salt$hash:20000:0:99999:7:::\n"
    }

    #[test]
    fn shadow_hash_is_the_second_field_of_the_users_line() {
        assert_eq!(
            parse_shadow_hash(shadow_file(), "alice").as_deref(),
            Some("$y$j9T$salt$hash")
        );
    }

    #[test]
    fn shadow_hash_of_an_unknown_user_is_none() {
        assert_eq!(parse_shadow_hash(shadow_file(), "ali"), None);
    }
}
