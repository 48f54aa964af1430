//! `[log] format = "json"`: one JSON object per line, for log shippers. The span fields are
//! flattened into the object, from the outermost span in: `{"timestamp", "level", "target",
//! "message", the event's fields, then the spans' fields}`. A span field the event carries
//! itself is written once, with the event's value.
//!
//! tracing-subscriber's own JSON format nests span fields under `span`/`spans`, and builds
//! that list from the spans *entered* on the thread, which misses an event's explicit parent
//! (`parent:` in the macro). wsgate names the parent instead of entering spans, so this
//! formatter walks the event's own scope.

use std::fmt;

use serde::ser::{SerializeMap, Serializer as _};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// The event formatter; span fields are kept by `JsonFields`, as JSON objects.
pub struct Json;

impl<S> FormatEvent<S, JsonFields> for Json
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, JsonFields>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut timestamp = String::new();
        SystemTime.format_time(&mut Writer::new(&mut timestamp))?;
        let meta = event.metadata();
        let mut line = Vec::with_capacity(256);
        let mut json = serde_json::Serializer::new(&mut line);
        let mut map = json.serialize_map(None).map_err(|_| fmt::Error)?;
        let mut written: Vec<String> = Vec::new();
        let mut head = || -> Result<(), serde_json::Error> {
            map.serialize_entry("timestamp", &timestamp)?;
            map.serialize_entry("level", meta.level().as_str())?;
            map.serialize_entry("target", meta.target())?;
            Ok(())
        };
        head().map_err(|_| fmt::Error)?;
        let mut fields = EventFields {
            map: &mut map,
            written: &mut written,
            failed: false,
        };
        event.record(&mut fields);
        if fields.failed {
            return Err(fmt::Error);
        }
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                let extensions = span.extensions();
                let Some(recorded) = extensions.get::<FormattedFields<JsonFields>>() else {
                    continue;
                };
                // `JsonFields` keeps a span's fields as one JSON object; an empty span, as "".
                let Ok(serde_json::Value::Object(object)) =
                    serde_json::from_str::<serde_json::Value>(recorded)
                else {
                    continue;
                };
                for (name, value) in object {
                    if !written.contains(&name) {
                        map.serialize_entry(&name, &value).map_err(|_| fmt::Error)?;
                        written.push(name);
                    }
                }
            }
        }
        SerializeMap::end(map).map_err(|_| fmt::Error)?;
        let line = std::str::from_utf8(&line).map_err(|_| fmt::Error)?;
        writeln!(writer, "{line}")
    }
}

/// Writes an event's fields as entries of the line's object: numbers and booleans as JSON
/// numbers and booleans, everything else (`%`, `?`, the message) as strings.
struct EventFields<'a, M> {
    map: &'a mut M,
    written: &'a mut Vec<String>,
    failed: bool,
}

impl<M: SerializeMap> EventFields<'_, M> {
    fn entry<V: serde::Serialize + ?Sized>(&mut self, field: &Field, value: &V) {
        if self.failed {
            return;
        }
        self.failed = self.map.serialize_entry(field.name(), value).is_err();
        self.written.push(field.name().to_owned());
    }
}

impl<M: SerializeMap> Visit for EventFields<'_, M> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.entry(field, &value);
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.entry(field, &value);
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.entry(field, &value);
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.entry(field, &value);
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.entry(field, value);
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.entry(field, &super::error_chain(value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.entry(field, &format!("{value:?}"));
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::fmt::MakeWriter;

    use super::*;

    /// Collects what the subscriber writes.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Lines {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Lines {
        type Writer = Lines;

        fn make_writer(&'a self) -> Lines {
            self.clone()
        }
    }

    fn logged(f: impl FnOnce()) -> Vec<(String, serde_json::Map<String, serde_json::Value>)> {
        let lines = Lines::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(lines.clone())
            .with_ansi(false)
            .fmt_fields(JsonFields::new())
            .event_format(Json)
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
        text.lines()
            .map(|line| match serde_json::from_str(line) {
                Ok(serde_json::Value::Object(object)) => (line.to_owned(), object),
                _ => panic!("not a JSON object: {line}"),
            })
            .collect()
    }

    #[test]
    fn one_flat_object_per_line_with_the_explicit_parent_s_fields() {
        let lines = logged(|| {
            let conn = tracing::info_span!("conn", listener = "http", peer = "127.0.0.1:1");
            let request =
                tracing::info_span!(parent: &conn, "request", path = "/a\"b", route = "r");
            // Not entered: named as the parent, as wsgate does.
            tracing::info!(parent: &request, event = "tunnel_closed", route = "r", bytes_up = 3u64, ok = true, "websocket closed");
            tracing::warn!(error = %"a: b", "no span");
        });
        assert_eq!(lines.len(), 2, "{lines:?}");
        let (raw, line) = &lines[0];
        assert_eq!(raw.matches("\"route\"").count(), 1, "written once: {raw}");
        let text = |key: &str| line.get(key).and_then(|v| v.as_str()).map(str::to_owned);
        assert_eq!(text("level").as_deref(), Some("INFO"));
        assert_eq!(text("message").as_deref(), Some("websocket closed"));
        assert_eq!(text("event").as_deref(), Some("tunnel_closed"));
        assert_eq!(text("listener").as_deref(), Some("http"));
        assert_eq!(text("peer").as_deref(), Some("127.0.0.1:1"));
        assert_eq!(text("path").as_deref(), Some("/a\"b"));
        assert_eq!(text("route").as_deref(), Some("r"));
        assert_eq!(line.get("bytes_up"), Some(&serde_json::json!(3)));
        assert_eq!(line.get("ok"), Some(&serde_json::json!(true)));
        assert!(
            text("timestamp").is_some_and(|t| t.ends_with('Z')),
            "{line:?}"
        );
        assert_eq!(text("target").as_deref(), Some(module_path!()));
        assert_eq!(lines[1].1.get("error"), Some(&serde_json::json!("a: b")));
        assert!(!lines[1].1.contains_key("listener"));
    }
}
