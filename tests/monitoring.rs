//! The monitoring plan as code: the shipped alert rules are valid, their
//! unit tests pass with `promtool`, and every alert has a runbook.

mod support;

use std::process::Command;

use support::repo::repo;

fn promtool(args: &[&str]) -> String {
    let output = Command::new("promtool")
        .args(args)
        .current_dir(repo("."))
        .output()
        .expect("promtool not found: install the Debian package `prometheus`");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

fn rule_files() -> Vec<String> {
    let mut files: Vec<String> = std::fs::read_dir(repo("alerts"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yml"))
        .map(|p| p.strip_prefix(repo(".")).unwrap().display().to_string())
        .collect();
    files.sort();
    assert!(!files.is_empty());
    files
}

#[test]
fn the_rule_files_are_valid() {
    let files = rule_files();
    let mut args = vec!["check", "rules"];
    args.extend(files.iter().map(String::as_str));
    let report = promtool(&args);
    assert!(report.contains("SUCCESS"), "{report}");
}

#[test]
fn every_alert_fires_on_its_case_and_stays_silent_on_the_near_miss() {
    let tests: Vec<String> = std::fs::read_dir(repo("alerts/tests"))
        .unwrap()
        .map(|e| format!("alerts/tests/{}", e.unwrap().file_name().to_string_lossy()))
        .collect();
    let mut args = vec!["test", "rules"];
    args.extend(tests.iter().map(String::as_str));
    promtool(&args);

    // Every alert has at least one test case.
    let tested = tests
        .iter()
        .map(|t| std::fs::read_to_string(repo(t)).unwrap())
        .collect::<String>();
    for alert in alerts() {
        assert!(
            tested.contains(&format!("alertname: {alert}\n")),
            "{alert} has no unit test"
        );
    }
}

/// The names of every alert in the shipped rule files.
fn alerts() -> Vec<String> {
    rule_files()
        .iter()
        .flat_map(|f| {
            std::fs::read_to_string(repo(f))
                .unwrap()
                .lines()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .filter_map(|l| l.trim().strip_prefix("- alert: ").map(str::to_owned))
        .collect()
}

#[test]
fn every_alert_links_to_a_runbook_that_exists() {
    let rules: String = rule_files()
        .iter()
        .map(|f| std::fs::read_to_string(repo(f)).unwrap())
        .collect();
    let alerts = alerts();
    assert!(alerts.len() >= 10, "{alerts:?}");
    for alert in alerts {
        let link = format!("runbook_url: \"docs/runbooks/{alert}.md\"");
        assert!(rules.contains(&link), "{alert} lacks {link}");
        let runbook = std::fs::read_to_string(repo(&format!("docs/runbooks/{alert}.md")))
            .unwrap_or_else(|_| panic!("docs/runbooks/{alert}.md is missing"));
        for section in ["## What it means", "## How to confirm", "## What to do"] {
            assert!(
                runbook.contains(section),
                "{alert}'s runbook lacks {section}"
            );
        }
    }
}
