//! Completions. Static scripts for the `kubectl-guestcred` binary (`completion SHELL`,
//! clap_complete), and the dynamic helper kubectl (1.26 or newer) runs to complete
//! `kubectl guestcred …`: `kubectl_complete-guestcred <words after "guestcred"…> <word
//! being completed>` prints one candidate per line, then Cobra's `:<directive>` line
//! (4: no file completion, 0: default, files).
use crate::cli::{Cli, Global, Shell};
use crate::util::connect;
use clap::CommandFactory;
use guestcred_api::kubevirt::VirtualMachineInstance;
use guestcred_api::{GuestPasswordReset, KeypairRebuild};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::ListParams;
use kube::{Api, Client, ResourceExt};
use serde::de::DeserializeOwned;
use std::time::Duration;

pub fn script(shell: Shell, out: &mut dyn std::io::Write) {
    // The scripts complete the binary's own name (kubectl completes `kubectl guestcred`
    // through kubectl_complete-guestcred).
    let mut cmd = Cli::command().bin_name("kubectl-guestcred");
    let shell = match shell {
        Shell::Bash => clap_complete::Shell::Bash,
        Shell::Zsh => clap_complete::Shell::Zsh,
        Shell::Fish => clap_complete::Shell::Fish,
    };
    clap_complete::generate(shell, &mut cmd, "kubectl-guestcred", out);
}

/// Cobra's ShellCompDirectiveNoFileComp.
const NO_FILES: u8 = 4;
/// Cobra's ShellCompDirectiveDefault (the shell completes file names).
const FILES: u8 = 0;

/// What the dynamic helper prints for `words` (the last one is being completed).
pub async fn dynamic(words: &[String]) -> (Vec<String>, u8) {
    let (to_complete, before) = match words.split_last() {
        Some((last, before)) => (last.as_str(), before),
        None => ("", &[][..]),
    };
    let root = Cli::command();
    let mut global = Global::default();
    let mut sub: Option<String> = None;
    let mut positionals = 0usize;
    // `-l SELECTOR` takes the place of the name (a VM, or for status an object).
    let mut selector = false;
    let mut i = 0;
    let takes_value = |sub: Option<&str>, flag: &str| -> bool {
        let cmd = sub.and_then(|s| root.find_subcommand(s)).unwrap_or(&root);
        cmd.get_arguments().chain(root.get_arguments()).any(|a| {
            let hit = match flag.strip_prefix("--") {
                Some(long) => a.get_long() == Some(long),
                None => flag.len() == 2 && a.get_short() == flag.chars().nth(1),
            };
            hit && a.get_action().takes_values()
        })
    };
    while i < before.len() {
        let w = &before[i];
        let value = before.get(i + 1).cloned();
        if w.starts_with('-') && !w.contains('=') && takes_value(sub.as_deref(), w) {
            match w.as_str() {
                "-n" | "--namespace" => global.namespace = value,
                "--context" => global.context = value,
                "--kubeconfig" => global.kubeconfig = value.map(Into::into),
                "-l" | "--selector" => selector = true,
                _ => {}
            }
            i += 2;
            continue;
        }
        if let Some((k, v)) = w.split_once('=') {
            match k {
                "-n" | "--namespace" => global.namespace = Some(v.into()),
                "--context" => global.context = Some(v.into()),
                "--kubeconfig" => global.kubeconfig = Some(v.into()),
                "-l" | "--selector" => selector = true,
                _ => {}
            }
        } else if !w.starts_with('-') {
            if sub.is_none() {
                sub = Some(w.clone());
            } else {
                positionals += 1;
            }
        }
        i += 1;
    }
    let prev = before.last().map(String::as_str).unwrap_or("");
    let prev_takes_value = prev.starts_with('-') && takes_value(sub.as_deref(), prev);
    let filter = |c: Vec<String>| -> Vec<String> {
        c.into_iter()
            .filter(|c| c.starts_with(to_complete))
            .collect()
    };
    if prev_takes_value {
        return match prev {
            "-n" | "--namespace" => (filter(cluster(&global, Names::Namespaces).await), NO_FILES),
            "--context" => (filter(contexts(&global)), NO_FILES),
            "--kubeconfig" | "-f" | "--filename" => (Vec::new(), FILES),
            "--from-secret" => (filter(cluster(&global, Names::Secrets).await), NO_FILES),
            "--vm" => (filter(cluster(&global, Names::Vms).await), NO_FILES),
            "-o" | "--output" => (
                filter(vec!["table".into(), "json".into(), "yaml".into()]),
                NO_FILES,
            ),
            "--mode" => (filter(vec!["auto".into(), "live".into()]), NO_FILES),
            _ => (Vec::new(), NO_FILES),
        };
    }
    let Some(sub) = sub else {
        if to_complete.starts_with('-') {
            return (filter(flags(&root)), NO_FILES);
        }
        let subs = root
            .get_subcommands()
            .map(|s| s.get_name().to_string())
            .collect();
        return (filter(subs), NO_FILES);
    };
    if to_complete.starts_with('-') {
        let cmd = root.find_subcommand(&sub).unwrap_or(&root);
        let mut all = flags(cmd);
        all.extend(flags(&root));
        return (filter(all), NO_FILES);
    }
    if positionals > 0 || selector {
        return (Vec::new(), NO_FILES);
    }
    let names = match sub.as_str() {
        "set-password" | "add-key" | "remove-key" | "list-keys" => {
            cluster(&global, Names::Vms).await
        }
        "status" => cluster(&global, Names::Runs).await,
        "show-password" | "rotate" => cluster(&global, Names::Resets).await,
        "completion" => vec!["bash".into(), "zsh".into(), "fish".into()],
        _ => Vec::new(),
    };
    (filter(names), NO_FILES)
}

fn flags(cmd: &clap::Command) -> Vec<String> {
    cmd.get_arguments()
        .filter(|a| !a.is_hide_set())
        .filter_map(|a| a.get_long().map(|l| format!("--{l}")))
        .collect()
}

fn contexts(g: &Global) -> Vec<String> {
    let kc = match &g.kubeconfig {
        Some(p) => kube::config::Kubeconfig::read_from(p),
        None => kube::config::Kubeconfig::read(),
    };
    kc.map(|k| k.contexts.into_iter().map(|c| c.name).collect())
        .unwrap_or_default()
}

#[derive(Clone, Copy)]
enum Names {
    Namespaces,
    Vms,
    Resets,
    Runs,
    Secrets,
}

/// Names from the cluster; nothing when it cannot be reached within a few seconds.
async fn cluster(g: &Global, what: Names) -> Vec<String> {
    let work = async {
        let (client, ns) = connect(g).await.ok()?;
        names(client, &ns, what).await.ok()
    };
    let mut names = tokio::time::timeout(Duration::from_secs(5), work)
        .await
        .ok()
        .flatten()
        .unwrap_or_default();
    names.sort();
    names.dedup();
    names
}

async fn names(client: Client, ns: &str, what: Names) -> kube::Result<Vec<String>> {
    match what {
        Names::Namespaces => names_in(Api::<Namespace>::all(client)).await,
        Names::Vms => names_in(Api::<VirtualMachineInstance>::namespaced(client, ns)).await,
        Names::Secrets => names_in(Api::<Secret>::namespaced(client, ns)).await,
        Names::Resets => names_in(Api::<GuestPasswordReset>::namespaced(client, ns)).await,
        Names::Runs => {
            let mut all =
                names_in(Api::<GuestPasswordReset>::namespaced(client.clone(), ns)).await?;
            all.extend(names_in(Api::<KeypairRebuild>::namespaced(client, ns)).await?);
            Ok(all)
        }
    }
}

/// The names of the objects `api` lists (metadata only).
async fn names_in<K>(api: Api<K>) -> kube::Result<Vec<String>>
where
    K: kube::Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    let list = api.list_metadata(&ListParams::default()).await?;
    Ok(list.items.iter().map(ResourceExt::name_any).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(w: &[&str]) -> Vec<String> {
        w.iter().map(|s| s.to_string()).collect()
    }

    #[tokio::test]
    async fn offline_candidates() {
        let (c, d) = dynamic(&words(&["set-"])).await;
        assert_eq!((c, d), (vec!["set-password".to_string()], NO_FILES));
        let (c, _) = dynamic(&words(&["set-password", "db-0", "--ge"])).await;
        assert_eq!(c, vec!["--generate".to_string()]);
        let (c, _) = dynamic(&words(&["status", "-o", ""])).await;
        assert_eq!(c, vec!["table", "json", "yaml"]);
        let (_, d) = dynamic(&words(&["add-key", "vm", "-f", ""])).await;
        assert_eq!(d, FILES);
        let (c, _) = dynamic(&words(&["completion", "z"])).await;
        assert_eq!(c, vec!["zsh".to_string()]);
    }
}
