//! Editing `users[name == user].ssh_authorized_keys` in cloud-config user data without
//! losing anything else in it, comments included.
//!
//! The edit is textual, on the block-style YAML cloud-config is written in: the user's
//! key entries that stay keep their lines (and the comments between them), removed
//! entries lose theirs, new ones are added as double-quoted scalars after the last entry
//! (or under a new `ssh_authorized_keys:` / user entry / `users:` key). No YAML library in
//! the dependency tree keeps comments (serde_yaml and every serde-based one parse into
//! values and drop them); a lossless one (a rowan-style YAML CST) would be a new parser at
//! the trust boundary for one list edit. Instead every textual edit is checked: the result
//! parsed must equal the original parsed with only that list changed. When it does not
//! (flow-style `users`, anchors, multi-line key scalars, ...), user data without comments
//! is re-serialized (nothing to lose); user data with comments is refused with the reason,
//! never silently stripped.
use serde_yaml::{Mapping, Value as Yaml};

/// Set the user's `ssh_authorized_keys` to `keys(existing)` in cloud-config text.
pub fn set_user_keys(
    text: &str,
    user: &str,
    keys: impl FnOnce(Vec<String>) -> Vec<String>,
) -> Result<String, String> {
    let body = text.trim_start();
    if !body.is_empty() && !body.starts_with("#cloud-config") {
        return Err(
            "it does not start with #cloud-config (scripts and MIME parts are not edited)".into(),
        );
    }
    let mut doc: Yaml = serde_yaml::from_str(body).map_err(|e| e.to_string())?;
    if doc.is_null() {
        doc = Yaml::Mapping(Mapping::new());
    }
    let existing = current_keys(&doc, user)?;
    let wanted = keys(existing);
    let mut expected = doc.clone();
    set_in_value(&mut expected, user, &wanted)?;
    if let Some(edited) = edit_text(text, user, &wanted) {
        let parsed: Result<Yaml, _> = serde_yaml::from_str(edited.trim_start());
        if parsed.is_ok_and(|p| p == expected) {
            return Ok(edited);
        }
    }
    let has_comments = text
        .lines()
        .any(|l| l.contains('#') && !l.trim_start().starts_with("#cloud-config"));
    if has_comments {
        return Err(format!(
            "the ssh_authorized_keys of user {user} could not be edited in place (flow-style or unusual YAML), and rewriting the document would drop its comments; write users[].ssh_authorized_keys in block style"
        ));
    }
    let yaml = serde_yaml::to_string(&expected).map_err(|e| e.to_string())?;
    Ok(format!("#cloud-config\n{yaml}"))
}

fn current_keys(doc: &Yaml, user: &str) -> Result<Vec<String>, String> {
    let Some(users) = doc.get("users") else {
        return Ok(Vec::new());
    };
    let list = users.as_sequence().ok_or("users is not a list")?;
    Ok(list
        .iter()
        .find(|u| u.get("name").and_then(Yaml::as_str) == Some(user))
        .and_then(|u| u.get("ssh_authorized_keys"))
        .and_then(Yaml::as_sequence)
        .map(|s| {
            s.iter()
                .filter_map(Yaml::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default())
}

/// The same edit on the parsed document (the reference the textual edit must match).
fn set_in_value(doc: &mut Yaml, user: &str, keys: &[String]) -> Result<(), String> {
    let root = doc
        .as_mapping_mut()
        .ok_or("the document is not a mapping")?;
    let users = root
        .entry(Yaml::from("users"))
        .or_insert_with(|| Yaml::Sequence(vec![Yaml::from("default")]));
    let list = users.as_sequence_mut().ok_or("users is not a list")?;
    let pos = list
        .iter()
        .position(|u| u.get("name").and_then(Yaml::as_str) == Some(user));
    let entry = match pos {
        Some(p) => &mut list[p],
        None => {
            let mut m = Mapping::new();
            m.insert(Yaml::from("name"), Yaml::from(user));
            list.push(Yaml::Mapping(m));
            list.last_mut().ok_or("users list is empty")?
        }
    };
    let m = entry
        .as_mapping_mut()
        .ok_or("a users entry is not a mapping")?;
    let new: Vec<Yaml> = keys.iter().map(|k| Yaml::from(k.as_str())).collect();
    m.insert(Yaml::from("ssh_authorized_keys"), Yaml::Sequence(new));
    Ok(())
}

fn indent(line: &str) -> usize {
    line.len() - line.trim_start_matches(' ').len()
}

/// Blank or a full-line comment: belongs to whatever block surrounds it.
fn is_filler(line: &str) -> bool {
    let t = line.trim();
    t.is_empty() || t.starts_with('#')
}

/// A scalar as YAML reads it (quotes, trailing comments); `None` if it is not one.
fn scalar(text: &str) -> Option<String> {
    match serde_yaml::from_str::<Yaml>(text).ok()? {
        Yaml::String(s) => Some(s),
        _ => None,
    }
}

/// `key:` at the start of `line` (after `indent` spaces): the rest of the line.
fn key_value<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let rest = line.trim_start().strip_prefix(key)?.strip_prefix(':')?;
    (rest.is_empty() || rest.starts_with([' ', '\t', '\n', '\r'])).then_some(rest)
}

/// Nothing but maybe a comment.
fn empty_value(rest: &str) -> bool {
    let t = rest.trim();
    t.is_empty() || t.starts_with('#')
}

fn quoted(key: &str) -> String {
    serde_json::to_string(key).unwrap_or_default()
}

/// The textual edit; `None` when the text is not in a shape it handles.
fn edit_text(text: &str, user: &str, wanted: &[String]) -> Option<String> {
    let mut lines: Vec<String> = text.split_inclusive('\n').map(str::to_string).collect();
    if let Some(l) = lines.last_mut()
        && !l.ends_with('\n')
    {
        l.push('\n');
    }
    let users_at = lines
        .iter()
        .position(|l| indent(l) == 0 && key_value(l, "users").is_some());
    let Some(users_at) = users_at else {
        // No users yet: the default user stays, as cloud-init would have created it.
        let mut out = lines.concat();
        out.push_str(&format!(
            "users:\n  - default\n  - name: {}\n",
            quoted(user)
        ));
        out.push_str("    ssh_authorized_keys:\n");
        for k in wanted {
            out.push_str(&format!("      - {}\n", quoted(k)));
        }
        return Some(out);
    };
    if !empty_value(key_value(&lines[users_at], "users")?) {
        return None; // flow style
    }
    // The users block: indented lines, or `-` items at column 0, and fillers among them.
    let mut end = users_at + 1;
    let mut last = users_at;
    while end < lines.len() {
        let l = &lines[end];
        if is_filler(l) {
            end += 1;
            continue;
        }
        if indent(l) == 0 && !l.starts_with('-') {
            break;
        }
        last = end;
        end += 1;
    }
    let block_end = last + 1;
    let item_indent = (users_at + 1..block_end)
        .find(|&i| !is_filler(&lines[i]))
        .map(|i| indent(&lines[i]))?;
    let is_item = |l: &str| indent(l) == item_indent && l.trim_start().starts_with('-');
    let items: Vec<usize> = (users_at + 1..block_end)
        .filter(|&i| is_item(&lines[i]))
        .collect();
    // Find the user's item: `name:` on the item line or at its content indent.
    let mut found: Option<(usize, usize, usize, usize)> = None; // (start, end, content indent, name line)
    for (n, &start) in items.iter().enumerate() {
        let stop = items.get(n + 1).copied().unwrap_or(block_end);
        let first = &lines[start];
        let after_dash = &first[item_indent + 1..];
        let content =
            item_indent + 1 + (after_dash.len() - after_dash.trim_start_matches(' ').len());
        for (i, l) in lines.iter().enumerate().take(stop).skip(start) {
            let field = if i == start {
                &l[content.min(l.len())..]
            } else if indent(l) == content {
                l.trim_start()
            } else {
                continue;
            };
            if let Some(v) = key_value(field, "name")
                && scalar(v).as_deref() == Some(user)
            {
                found = Some((start, stop, content, i));
            }
        }
        if found.is_some() {
            break;
        }
    }
    let Some((start, stop, content, name_line)) = found else {
        // A new item at the end of the users block.
        let pad = " ".repeat(item_indent);
        let mut add = format!(
            "{pad}- name: {}\n{pad}  ssh_authorized_keys:\n",
            quoted(user)
        );
        for k in wanted {
            add.push_str(&format!("{pad}    - {}\n", quoted(k)));
        }
        lines.insert(block_end, add);
        return Some(lines.concat());
    };
    // The item's ssh_authorized_keys.
    let key_line = (start..stop).find(|&i| {
        let l = &lines[i];
        let field = if i == start {
            &l[content.min(l.len())..]
        } else if indent(l) == content {
            l.trim_start()
        } else {
            return false;
        };
        key_value(field, "ssh_authorized_keys").is_some()
    });
    let Some(key_line) = key_line else {
        let pad = " ".repeat(content);
        let mut add = format!("{pad}ssh_authorized_keys:\n");
        for k in wanted {
            add.push_str(&format!("{pad}  - {}\n", quoted(k)));
        }
        lines.insert(name_line + 1, add);
        return Some(lines.concat());
    };
    let field_start = if key_line == start {
        content
    } else {
        indent(&lines[key_line])
    };
    let rest = key_value(
        &lines[key_line][field_start.min(lines[key_line].len())..],
        "ssh_authorized_keys",
    )?;
    if !empty_value(rest) {
        // Flow style on one line: rewrite that value only.
        let head = &lines[key_line][..field_start];
        let list: Vec<String> = wanted.iter().map(|k| quoted(k)).collect();
        lines[key_line] = format!("{head}ssh_authorized_keys: [{}]\n", list.join(", "));
        return Some(lines.concat());
    }
    // Block list: entries are `-` lines deeper than the key (or at its indent).
    let mut entries: Vec<(usize, String)> = Vec::new();
    let mut i = key_line + 1;
    let mut entry_indent = None;
    while i < stop {
        let l = &lines[i];
        if is_filler(l) {
            i += 1;
            continue;
        }
        let ind = indent(l);
        let is_entry = l.trim_start().starts_with('-') && ind >= field_start;
        if !is_entry || entry_indent.is_some_and(|e| e != ind) {
            if ind > field_start && !is_entry {
                return None; // a multi-line scalar
            }
            break;
        }
        entry_indent = Some(ind);
        let value = l.trim_start()[1..].trim_start();
        entries.push((i, scalar(value)?));
        i += 1;
    }
    let entry_indent = entry_indent.unwrap_or(field_start + 2);
    let mut keep: Vec<&String> = wanted.iter().collect();
    let mut drop_lines = Vec::new();
    for (line, value) in &entries {
        match keep.iter().position(|k| *k == value) {
            Some(p) => {
                keep.remove(p);
            }
            None => drop_lines.push(*line),
        }
    }
    let insert_at = entries.last().map_or(key_line + 1, |(l, _)| l + 1);
    let pad = " ".repeat(entry_indent);
    let add: String = keep
        .iter()
        .map(|k| format!("{pad}- {}\n", quoted(k)))
        .collect();
    lines.insert(insert_at, add);
    for l in drop_lines.into_iter().rev() {
        lines.remove(l);
    }
    // Existing entries keep their order; wanted order is only imposed on new ones.
    Some(lines.concat())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys_of(text: &str, user: &str) -> Vec<String> {
        let doc: Yaml = serde_yaml::from_str(text).expect("yaml");
        current_keys(&doc, user).expect("keys")
    }

    #[test]
    fn keys_are_set_for_a_new_user_entry() {
        let out = set_user_keys("#cloud-config\npackage_update: true\n", "root", |_| {
            vec!["ssh-ed25519 AAAA k".into()]
        })
        .expect("edit");
        let doc: Yaml = serde_yaml::from_str(&out).expect("yaml");
        assert_eq!(doc["package_update"], Yaml::from(true));
        assert_eq!(doc["users"][0], Yaml::from("default"));
        assert_eq!(keys_of(&out, "root"), ["ssh-ed25519 AAAA k"]);
        assert!(out.starts_with("#cloud-config\n"));
    }

    #[test]
    fn existing_keys_are_handed_to_the_merge() {
        let text = "#cloud-config\nusers:\n- name: alice\n  ssh_authorized_keys: [old]\n";
        let out = set_user_keys(text, "alice", |mut e| {
            e.push("new".into());
            e
        })
        .expect("edit");
        assert_eq!(keys_of(&out, "alice"), ["old", "new"]);
    }

    #[test]
    fn shell_script_user_data_is_not_edited() {
        assert!(set_user_keys("#!/bin/sh\necho hi\n", "root", |k| k).is_err());
    }

    const COMMENTED: &str = "#cloud-config
# Provisioned by the platform team: do not edit by hand.
hostname: web-0   # the short name
users:
  - default
  # the deploy user
  - name: alice
    sudo: ALL=(ALL) NOPASSWD:ALL
    ssh_authorized_keys:
      # laptop
      - ssh-ed25519 AAAA old-laptop
      - \"ssh-ed25519 BBBB kept\"   # CI
  - name: bob
    ssh_authorized_keys:
      - ssh-ed25519 CCCC bob
runcmd:
  - [echo, hi]   # keep me
";

    #[test]
    fn comments_and_everything_else_survive_a_key_edit() {
        let out = set_user_keys(COMMENTED, "alice", |existing| {
            assert_eq!(
                existing,
                ["ssh-ed25519 AAAA old-laptop", "ssh-ed25519 BBBB kept"]
            );
            vec![
                "ssh-ed25519 BBBB kept".into(),
                "ssh-ed25519 DDDD new".into(),
            ]
        })
        .expect("edit");
        for kept in [
            "# Provisioned by the platform team: do not edit by hand.",
            "hostname: web-0   # the short name",
            "  # the deploy user",
            "      # laptop",
            "      - \"ssh-ed25519 BBBB kept\"   # CI",
            "  - [echo, hi]   # keep me",
            "      - ssh-ed25519 CCCC bob",
        ] {
            assert!(out.contains(kept), "{kept:?} lost:\n{out}");
        }
        assert!(!out.contains("old-laptop"), "{out}");
        assert_eq!(
            keys_of(&out, "alice"),
            ["ssh-ed25519 BBBB kept", "ssh-ed25519 DDDD new"]
        );
        assert_eq!(keys_of(&out, "bob"), ["ssh-ed25519 CCCC bob"]);
    }

    #[test]
    fn a_user_without_keys_and_a_missing_user_are_added_in_place() {
        let text = "#cloud-config\n# top\nusers:\n- name: alice   # me\n  shell: /bin/bash\nfinal_message: done\n";
        let out = set_user_keys(text, "alice", |_| vec!["k1 x".into()]).expect("edit");
        assert!(
            out.contains("- name: alice   # me\n") && out.contains("# top"),
            "{out}"
        );
        assert_eq!(keys_of(&out, "alice"), ["k1 x"]);
        let out = set_user_keys(text, "carol", |_| vec!["k2 y".into()]).expect("edit");
        assert_eq!(keys_of(&out, "carol"), ["k2 y"]);
        assert!(
            out.contains("final_message: done") && out.contains("# top"),
            "{out}"
        );
    }

    #[test]
    fn commented_user_data_that_cannot_be_edited_in_place_is_refused_not_stripped() {
        let text = "#cloud-config\n# keep\nusers: [{name: alice, ssh_authorized_keys: [a]}]\n";
        let err = set_user_keys(text, "alice", |_| vec!["b".into()]).expect_err("refused");
        assert!(err.contains("comments"), "{err}");
    }
}
