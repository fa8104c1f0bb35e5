//! kubectl's label selector syntax (`a=b,c!=d,e in (x,y),f notin (z),g,!h`) as a
//! `LabelSelector` for `spec.target.selector` (`kubectl guestcred ... -l`); the lab's API
//! server splits its `labelSelector` queries into terms with [`split_terms`] too.
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
use std::collections::BTreeMap;

pub fn parse(s: &str) -> Result<LabelSelector, String> {
    if !balanced(s) {
        return Err(format!("invalid selector {s:?}: unbalanced parentheses"));
    }
    let mut labels = BTreeMap::new();
    let mut exprs = Vec::new();
    for term in split_terms(s) {
        let term = term.trim();
        if term.is_empty() {
            return Err(format!("invalid selector {s:?}: empty term"));
        }
        let req = |key: &str, op: &str, values: Option<Vec<String>>| LabelSelectorRequirement {
            key: key.trim().to_string(),
            operator: op.to_string(),
            values,
        };
        if let Some((k, v)) = term.split_once("!=") {
            exprs.push(req(k, "NotIn", Some(vec![v.trim().to_string()])));
        } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
            labels.insert(k.trim().to_string(), v.trim().to_string());
        } else if let Some((k, rest)) = split_word(term, " notin ") {
            exprs.push(req(k, "NotIn", Some(values(rest, s)?)));
        } else if let Some((k, rest)) = split_word(term, " in ") {
            exprs.push(req(k, "In", Some(values(rest, s)?)));
        } else if let Some(k) = term.strip_prefix('!') {
            exprs.push(req(k, "DoesNotExist", None));
        } else {
            exprs.push(req(term, "Exists", None));
        }
    }
    for e in &exprs {
        if e.key.is_empty() || e.key.contains(char::is_whitespace) {
            return Err(format!("invalid selector {s:?}: bad key {:?}", e.key));
        }
    }
    Ok(LabelSelector {
        match_labels: (!labels.is_empty()).then_some(labels),
        match_expressions: (!exprs.is_empty()).then_some(exprs),
    })
}

fn split_word<'a>(term: &'a str, word: &str) -> Option<(&'a str, &'a str)> {
    term.find(word)
        .map(|i| (&term[..i], term[i + word.len()..].trim()))
}

fn values(rest: &str, s: &str) -> Result<Vec<String>, String> {
    let inner = rest
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
        .ok_or_else(|| format!("invalid selector {s:?}: values must be in parentheses"))?;
    Ok(inner
        .split(',')
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .collect())
}

/// Whether every ')' closes an earlier '(' and every '(' is closed.
fn balanced(s: &str) -> bool {
    let mut depth = 0i32;
    for c in s.chars() {
        depth += match c {
            '(' => 1,
            ')' => -1,
            _ => 0,
        };
        if depth < 0 {
            return false;
        }
    }
    depth == 0
}

/// Terms split on commas outside parentheses (`a in (x,y),b` is two terms), untrimmed,
/// empty ones kept. Parentheses are not checked here ([`parse`] refuses unbalanced ones).
pub fn split_terms(s: &str) -> Vec<&str> {
    let mut terms = Vec::new();
    let (mut depth, mut start) = (0i32, 0usize);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                terms.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    terms.push(&s[start..]);
    terms
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubectl_forms() {
        let sel = parse("tier=db,env!=prod,zone in (a, b),!legacy,owner").unwrap();
        assert_eq!(sel.match_labels.unwrap()["tier"], "db");
        let ops: Vec<_> = sel
            .match_expressions
            .unwrap()
            .into_iter()
            .map(|e| (e.key, e.operator, e.values.unwrap_or_default()))
            .collect();
        assert_eq!(
            ops,
            vec![
                ("env".into(), "NotIn".into(), vec!["prod".to_string()]),
                (
                    "zone".into(),
                    "In".into(),
                    vec!["a".to_string(), "b".to_string()]
                ),
                ("legacy".into(), "DoesNotExist".into(), vec![]),
                ("owner".into(), "Exists".into(), vec![]),
            ]
        );
        assert!(parse("a in (b").is_err());
        assert!(parse("a,,b").is_err());
    }

    #[test]
    fn terms_split_on_commas_outside_parentheses_only() {
        assert_eq!(
            split_terms("a in (x,y), b,,c"),
            ["a in (x,y)", " b", "", "c"]
        );
        assert!(parse("a in )x,y(").is_err(), "a ')' before its '('");
    }
}
