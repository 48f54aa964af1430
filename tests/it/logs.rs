//! Log output of the real binary: plain text when stderr is not a terminal.

use crate::support::binary::{self, TempFile};
use crate::support::WAIT;

const CONFIG: &str = "[[listener]]\nname = \"http\"\nbind = \"127.0.0.1:0\"\n\n\
                      [[route]]\nname = \"health\"\nrespond = { status = 200, body = \"up\" }\n";

/// A file, journald or a pipe gets no colour codes, with `NO_COLOR` unset (the support code
/// removes it), so it is wsgate that notices stderr is not a terminal.
#[test]
fn logs_to_a_pipe_carry_no_colour_codes() {
    let config = TempFile::new("plain-logs", CONFIG);
    let mut gateway = binary::Gateway::spawn(&config.path);
    gateway.wait_for_line("listening");
    gateway.wait_for_signal_handlers();
    gateway.signal("TERM");
    gateway.wait_for_line("drained");
    assert_eq!(gateway.wait_exit(WAIT).code(), Some(0));
    let log = gateway.log.join("\n");
    assert!(gateway.log.len() >= 3, "{log}");
    assert!(log.contains(" INFO "), "levels are plain words: {log}");
    assert!(
        !log.contains("\x1b["),
        "colour codes in a piped log:\n{log:?}"
    );
}

/// An invalid `RUST_LOG` is said, not silently replaced by the configured level.
#[test]
fn an_invalid_rust_log_is_reported_and_the_config_level_used() {
    let config = TempFile::new("bad-rust-log", CONFIG);
    let mut gateway = binary::Gateway::spawn_with_env(&config.path, &[("RUST_LOG", "wsgate=[")]);
    let warning = gateway.wait_for_line("RUST_LOG is not a valid filter");
    assert!(warning.contains("wsgate=["), "{warning}");
    // The configured level (info by default) is in force.
    gateway.wait_for_line("listening");
    gateway.wait_for_signal_handlers();
    gateway.signal("TERM");
    assert_eq!(gateway.wait_exit(WAIT).code(), Some(0));
}
