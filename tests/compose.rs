//! The docker-compose stack and the dashboards, checked without a Docker
//! engine: `docker-compose config` accepts the file, everything it mounts
//! exists, every service another one talks to is defined under that name,
//! and the dashboards are importable as they are.

mod support;

use std::process::Command;

use serde_json::Value;
use support::repo::{dashboards, repo};

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Names of the services defined in docker-compose.yml.
fn services(compose: &str) -> Vec<String> {
    let mut inside = false;
    let mut names = Vec::new();
    for line in compose.lines() {
        if !line.starts_with(' ') && !line.is_empty() {
            inside = line == "services:";
            continue;
        }
        if inside
            && line.starts_with("  ")
            && !line.starts_with("   ")
            && line.trim_end().ends_with(':')
        {
            names.push(line.trim().trim_end_matches(':').to_owned());
        }
    }
    names
}

#[test]
fn docker_compose_accepts_the_stack() {
    let output = Command::new("docker-compose")
        .args(["-f", "docker-compose.yml", "config", "--quiet"])
        .current_dir(repo("."))
        .output()
        .expect("docker-compose not found: install the Debian package `docker-compose`");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn every_mounted_file_exists_and_every_peer_is_a_service() {
    let compose = read("docker-compose.yml");
    let defined = services(&compose);
    for wanted in [
        "postgres",
        "pgwarden",
        "prometheus",
        "alertmanager",
        "grafana",
        "jaeger",
    ] {
        assert!(
            defined.iter().any(|s| s == wanted),
            "service {wanted} is missing: {defined:?}"
        );
    }
    let mounts: Vec<&str> = compose
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- ./"))
        .map(|m| m.split(':').next().unwrap())
        .collect();
    assert!(mounts.len() >= 6, "{mounts:?}");
    for mount in mounts {
        assert!(
            repo(mount).exists(),
            "docker-compose.yml mounts ./{mount}, which does not exist"
        );
    }
    // Every host:port another component sends to names a defined service.
    let peers = [
        ("alerts/config/prometheus.yml", "pgwarden:9464"),
        ("alerts/config/prometheus.yml", "alertmanager:9093"),
        (
            "dashboards/provisioning/datasources/datasources.yml",
            "prometheus:9090",
        ),
        (
            "dashboards/provisioning/datasources/datasources.yml",
            "jaeger:16686",
        ),
        ("docker-compose.yml", "jaeger:4318"),
        ("docker-compose.yml", "postgres:5432"),
    ];
    for (file, peer) in peers {
        assert!(read(file).contains(peer), "{file} does not send to {peer}");
        let service = peer.split(':').next().unwrap();
        assert!(
            defined.iter().any(|s| s == service),
            "{file} sends to {service}, which is not a service"
        );
    }
    assert!(compose.contains("./alerts/pgwarden.rules.yml:/etc/prometheus/rules/"));
    assert!(read("alerts/config/prometheus.yml").contains("/etc/prometheus/rules/*.yml"));
    assert!(compose.contains("./dashboards:/var/lib/grafana/dashboards"));
    assert!(
        read("dashboards/provisioning/dashboards/dashboards.yml")
            .contains("/var/lib/grafana/dashboards")
    );
}

#[test]
fn the_image_is_multi_stage_and_runs_as_a_non_root_user() {
    let dockerfile = read("Dockerfile");
    assert_eq!(
        dockerfile
            .lines()
            .filter(|l| l.starts_with("FROM "))
            .count(),
        2
    );
    let user = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("a USER line");
    assert_ne!(user.trim(), "root");
    assert_ne!(user.trim(), "0");
}

#[test]
fn dashboards_are_importable_and_every_panel_says_what_to_look_for() {
    let mut uids = Vec::new();
    for (path, dashboard) in dashboards() {
        let name = path.display().to_string();
        assert!(
            dashboard["uid"].as_str().is_some_and(|u| !u.is_empty()),
            "{name}: no uid"
        );
        uids.push(dashboard["uid"].as_str().unwrap().to_owned());
        assert!(
            dashboard["refresh"].is_string() && dashboard["time"]["from"].is_string(),
            "{name}"
        );
        let variables: Vec<&str> = dashboard["templating"]["list"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["name"].as_str().unwrap())
            .collect();
        assert_eq!(variables, ["datasource", "job", "instance"], "{name}");
        let panels = dashboard["panels"].as_array().unwrap();
        let mut ids: Vec<u64> = panels.iter().map(|p| p["id"].as_u64().unwrap()).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), panels.len(), "{name}: panel ids repeat");
        for panel in panels {
            let title = panel["title"].as_str().unwrap_or("");
            assert!(!title.is_empty(), "{name}: a panel without title");
            assert!(
                panel["description"].as_str().is_some_and(|d| d.len() > 20),
                "{title}: no description"
            );
            assert_eq!(
                panel["datasource"]["uid"], "${datasource}",
                "{title}: hard-coded datasource"
            );
            assert!(
                !panel["targets"].as_array().unwrap().is_empty(),
                "{title}: no query"
            );
        }
    }
    assert!(uids.contains(&"pgwarden-overview".to_owned()));
}

#[test]
fn runbooks_name_only_panels_that_exist() {
    let dashboard: Value =
        serde_json::from_str(&read("dashboards/pgwarden-overview.json")).unwrap();
    let titles: Vec<&str> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["title"].as_str().unwrap())
        .collect();
    for entry in std::fs::read_dir(repo("docs/runbooks")).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        for named in text.split("**").skip(1).step_by(2) {
            assert!(
                titles.contains(&named),
                "{} names panel {named:?}, which the dashboard lacks",
                path.display()
            );
        }
    }
}
