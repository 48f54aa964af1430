//! Configuration errors are `file:line:col: message`, all of them at once, through the library
//! and through `wsgate check`; the shipped config is valid.

use std::path::Path;

use wsgate::config::{self, Diagnostic, Error};
use wsgate::Server;

use crate::support::binary::{self, TempFile};
use crate::support::*;

const LISTENER: &str = "[[listener]]\nname = \"http\"\nbind = \"127.0.0.1:0\"\n";

fn diagnostics(text: &str) -> Vec<Diagnostic> {
    match config::parse(text, "gw.toml") {
        Ok(_) => panic!("accepted an invalid config:\n{text}"),
        Err(Error::Invalid(diagnostics)) => diagnostics,
        Err(other) => panic!("unexpected error: {other}"),
    }
}

/// The Display form, one line per problem.
fn error_lines(text: &str) -> Vec<String> {
    let err = config::parse(text, "gw.toml").expect_err("invalid config");
    err.to_string().lines().map(str::to_owned).collect()
}

/// `file:line:col: message` with positive numbers and a message.
fn assert_located(line: &str, file: &str) {
    let rest = line
        .strip_prefix(file)
        .and_then(|r| r.strip_prefix(':'))
        .unwrap_or_else(|| panic!("{line:?} does not start with {file}:"));
    let mut parts = rest.splitn(3, ':');
    let line_no: usize = parts.next().unwrap().parse().expect("line number");
    let col: usize = parts.next().unwrap().parse().expect("column");
    let message = parts.next().expect("message");
    assert!(line_no >= 1 && col >= 1, "{line:?}");
    assert!(message.starts_with(' ') && message.len() > 1, "{line:?}");
}

#[test]
fn unknown_key_is_reported_at_its_line_and_column() {
    let text = format!("{LISTENER}\n[timeouts]\nconect = \"5s\"\n");
    let lines = error_lines(&text);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].starts_with("gw.toml:6:1: unknown field `conect`"),
        "{lines:?}"
    );
}

#[test]
fn unknown_upstream_is_reported_with_the_known_ones() {
    let text = format!(
        "{LISTENER}[[upstream]]\nname = \"app\"\nservers = [\"127.0.0.1:9000\"]\n\
         [[upstream]]\nname = \"api\"\nservers = [\"127.0.0.1:9001\"]\n\
         [[route]]\nname = \"web\"\nupstream = \"ap\"\n"
    );
    assert_eq!(
        error_lines(&text),
        ["gw.toml:12:12: route \"web\" refers to unknown upstream \"ap\" (known: app, api)"]
    );
}

#[test]
fn bad_duration_and_bad_bind_are_located_at_their_values() {
    let text = "[timeouts]\ndrain = \"30 seconds\"\n\
                [[listener]]\nname = \"http\"\nbind = \"localhost:8080\"\n";
    assert_eq!(
        error_lines(text),
        [
            "gw.toml:2:9: invalid duration \"30 seconds\": expected a positive number with a unit, e.g. \"250ms\", \"5s\", \"2m\", \"1h\"",
            "gw.toml:5:8: invalid bind address \"localhost:8080\": expected ip:port, e.g. \"127.0.0.1:8080\" or \"[::]:443\"",
        ]
    );
    let found = diagnostics(text);
    assert_eq!((found[1].location.line, found[1].location.col), (5, 8));
    assert_eq!(found[1].location.file, "gw.toml");
}

#[test]
fn every_problem_is_reported_once_each_located_and_in_file_order() {
    let text = "workers = -1\n\
                [log]\nlevel = \"info\"\n\
                [timeouts]\nconnect = \"0s\"\nwebsocket_idle = \"10 minutes\"\n\
                [limits]\nrequest_header_bytes = 10\n\
                [[listener]]\nname = \"a\"\nbind = \"nowhere\"\n\
                [[route]]\nname = \"r\"\npath = \"api\"\nupstream = \"x\"\n\
                [[route]]\nname = \"s\"\nrespond = { status = 99 }\n\
                [[upstream]]\nname = \"u\"\nbalance = \"random\"\nservers = [\"nope\"]\n";
    let lines = error_lines(text);
    assert_eq!(lines.len(), 9, "{lines:#?}");
    for line in &lines {
        assert_located(line, "gw.toml");
    }
    let positions: Vec<(usize, usize)> = diagnostics(text)
        .iter()
        .map(|d| (d.location.line, d.location.col))
        .collect();
    let mut sorted = positions.clone();
    sorted.sort_unstable();
    assert_eq!(positions, sorted, "not in file order");
    assert!(lines[0].starts_with("gw.toml:1:11: workers must be between"));
}

#[test]
fn toml_syntax_error_is_located() {
    let lines = error_lines("[[listener]\nname = \"http\"\n");
    assert!(
        lines[0].starts_with("gw.toml:1:11: invalid table header"),
        "{lines:?}"
    );
}

#[test]
fn toml_syntax_error_is_one_located_line() {
    let lines = error_lines("[[listener]\nname = \"http\"\n");
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_located(&lines[0], "gw.toml");
}

#[tokio::test]
async fn binding_a_port_in_use_fails_naming_the_listener() {
    let busy = within(WAIT, tokio::net::TcpListener::bind("127.0.0.1:0"))
        .await
        .unwrap();
    let address = busy.local_addr().unwrap();
    let text = format!("[[listener]]\nname = \"busy\"\nbind = \"{address}\"\n");
    let config = config::parse(&text, "gw.toml").expect("valid config");
    match within(WAIT, Server::bind(&config, None)).await {
        Ok(_) => panic!("bound {address} twice"),
        Err(err) => assert_eq!(
            err.to_string(),
            format!("listener \"busy\" cannot bind {address}")
        ),
    }
}

const VALID: &str = "[[listener]]\nname = \"http\"\nbind = \"127.0.0.1:0\"\n\n\
                     [[route]]\nname = \"health\"\npath = \"/healthz\"\nrespond = { status = 200, body = \"ok\" }\n\n\
                     [[route]]\nname = \"app\"\nupstream = \"app\"\n\n\
                     [[upstream]]\nname = \"app\"\nservers = [\"127.0.0.1:9000\"]\n";

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn check_accepts_a_valid_file_with_exit_0() {
    let file = TempFile::new("valid", VALID);
    let output = binary::run(&["check", "--config", &file.display()]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    assert_eq!(
        text(&output.stdout),
        format!(
            "{}: ok (1 listener(s), 2 route(s), 1 upstream(s))\n",
            file.display()
        )
    );
}

#[test]
fn check_rejects_an_invalid_file_with_exit_2_and_every_problem() {
    let file = TempFile::new(
        "invalid",
        "[timeouts]\ndrain = \"soon\"\n[[listener]]\nname = \"http\"\nbind = \"127.0.0.1\"\n\
         [[route]]\nname = \"app\"\nupstream = \"missing\"\n",
    );
    let output = binary::run(&["check", "--config", &file.display()]);
    assert_eq!(output.status.code(), Some(2));
    assert!(output.stdout.is_empty(), "{}", text(&output.stdout));
    let stderr = text(&output.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    let path = file.display();
    assert_eq!(lines.len(), 4, "{stderr}");
    for line in &lines[..3] {
        assert_located(line, &path);
    }
    assert!(lines[0].starts_with(&format!("{path}:2:9: invalid duration \"soon\"")));
    assert!(lines[1].starts_with(&format!("{path}:5:8: invalid bind address")));
    assert!(lines[2].starts_with(&format!(
        "{path}:8:12: route \"app\" refers to unknown upstream \"missing\" (known: none)"
    )));
    assert_eq!(lines[3], format!("{path}: 3 problem(s)"));
}

#[test]
fn check_reports_a_missing_file_with_exit_2() {
    let missing = std::env::temp_dir().join(format!(
        "wsgate-it-{}-does-not-exist.toml",
        std::process::id()
    ));
    let missing = missing.display().to_string();
    let output = binary::run(&["check", "--config", &missing]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = text(&output.stderr);
    assert!(
        stderr.starts_with(&format!("cannot read {missing}: ")),
        "{stderr}"
    );
}

#[test]
fn shipped_config_passes_check() {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml");
    let shipped = shipped.display().to_string();
    let output = binary::run(&["check", "--config", &shipped]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    assert!(text(&output.stdout).starts_with(&format!("{shipped}: ok (")));
}

#[test]
fn version_flag_prints_the_package_version() {
    let output = binary::run(&["--version"]);
    assert_eq!(output.status.code(), Some(0));
    assert_eq!(
        text(&output.stdout).trim(),
        format!("wsgate {}", env!("CARGO_PKG_VERSION"))
    );
}
