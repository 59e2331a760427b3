//! Routing table files: routes from signal type patterns to targets (and, for checking, sample
//! signal types) in JSON or TOML. A node subscribes a table's routes at start
//! (`NodeOptions::routes`, `cadre node --routes FILE`).
//!
//! ```json
//! {"routes":[{"path":"user.**","target":"audit","priority":10}], "signals":[{"type":"user.1.created"}]}
//! ```
//!
//! `target` is a string, a JSON object, or a list of these; `priority` defaults to 0. `cadre routes
//! check` takes targets as opaque names; a node loading the file (`--routes`) needs objects that
//! are dispatch configurations (`{"log":{}}`, `{"webhook":{"url":"http://..."}}`). An invalid
//! table is refused as a whole with a [`TableError`] naming the route (position and path) and the
//! reason.

use serde::{Deserialize, Serialize};

pub use super::{PathError, RouteError};
use super::{NoMatch, RouteSpec, Router};

/// Largest table file accepted.
pub const TABLE_LEN_MAX_BYTES: usize = 16 << 20;
/// Most routes in one table.
pub const TABLE_ROUTES_MAX: usize = 100_000;

/// One target: a name, or an object (a dispatch configuration for a node).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Target {
    /// An opaque name (`"audit"`).
    Name(String),
    /// A JSON object: for a node, a dispatch configuration (`{"webhook":{"url":"http://..."}}`).
    Object(serde_json::Map<String, serde_json::Value>),
}

impl From<&str> for Target {
    fn from(s: &str) -> Self {
        Target::Name(s.to_string())
    }
}

/// A route's `target`: one, or a list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Targets {
    /// A single target.
    One(Target),
    /// A list of targets.
    Many(Vec<Target>),
}

impl Targets {
    /// The targets as a list.
    pub fn to_vec(&self) -> Vec<Target> {
        match self {
            Targets::One(t) => vec![t.clone()],
            Targets::Many(ts) => ts.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
/// One route of a table.
pub struct TableRoute {
    /// The pattern over dot-separated signal types (`user.*.created`, `user.**`).
    pub path: String,
    /// Where matching signals go.
    pub target: Targets,
    /// Higher priorities come first among the matching routes (-100..=100; default 0).
    #[serde(default)]
    pub priority: i32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
/// A sample signal type, to check what it routes to (`cadre routes check`).
pub struct TableSignal {
    /// The signal type (`"type"` in the file).
    #[serde(rename = "type")]
    pub ty: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
/// A routing table: routes, and sample signal types to check them with.
pub struct Table {
    /// The routes.
    #[serde(default)]
    pub routes: Vec<TableRoute>,
    /// Sample signal types (used by [`check`] only).
    #[serde(default)]
    pub signals: Vec<TableSignal>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
/// Why a table was refused.
pub enum TableError {
    /// The text is longer than [`TABLE_LEN_MAX_BYTES`].
    #[error("table of {len} bytes exceeds {TABLE_LEN_MAX_BYTES} bytes")]
    TooLarge {
        /// The text's length, in bytes.
        len: usize,
    },
    /// Not valid JSON or TOML, or not shaped as a table.
    #[error("cannot parse the table: {0}")]
    Parse(String),
    /// More than [`TABLE_ROUTES_MAX`] routes.
    #[error("more than {TABLE_ROUTES_MAX} routes")]
    TooManyRoutes,
    /// A route is invalid.
    #[error("route #{index}: {error}")]
    Route {
        /// The route's position in the table (0-based).
        index: usize,
        /// What is wrong with it.
        error: RouteError,
    },
}

/// The format of a table's text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// JSON.
    Json,
    /// TOML.
    Toml,
}

impl Format {
    /// By file extension: `.toml` is TOML, anything else JSON.
    pub fn from_path(path: &std::path::Path) -> Format {
        match path.extension().and_then(|e| e.to_str()) {
            Some("toml") => Format::Toml,
            _ => Format::Json,
        }
    }
}

impl Table {
    /// Parses a table; refuses one longer than [`TABLE_LEN_MAX_BYTES`] or with more than
    /// [`TABLE_ROUTES_MAX`] routes. Routes are validated when used (see [`check`]).
    pub fn parse(text: &str, format: Format) -> Result<Table, TableError> {
        if text.len() > TABLE_LEN_MAX_BYTES {
            return Err(TableError::TooLarge { len: text.len() });
        }
        let table: Table = match format {
            Format::Json => serde_json::from_str(text).map_err(|e| TableError::Parse(e.to_string()))?,
            Format::Toml => toml::from_str(text).map_err(|e| TableError::Parse(e.to_string()))?,
        };
        if table.routes.len() > TABLE_ROUTES_MAX {
            return Err(TableError::TooManyRoutes);
        }
        Ok(table)
    }

    /// Builds a router with every route, or names the first invalid one.
    pub(crate) fn router<S>(&self) -> Result<Router<Target, S>, TableError> {
        let mut router = Router::new();
        for (index, r) in self.routes.iter().enumerate() {
            let spec =
                RouteSpec { path: r.path.clone(), targets: r.target.to_vec(), priority: r.priority, predicate: None };
            router.add(spec).map_err(|error| TableError::Route { index, error })?;
        }
        Ok(router)
    }
}

/// The result line for one checked signal type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum CheckLine {
    /// The type's targets, in priority order.
    Targets {
        /// The signal type.
        #[serde(rename = "type")]
        ty: String,
        /// Its targets.
        targets: Vec<Target>,
    },
    /// The type could not be routed (`no_match`).
    Error {
        /// The signal type.
        #[serde(rename = "type")]
        ty: String,
        /// Why.
        error: String,
    },
}

/// Routes every listed signal type; one line per signal, in order. Fails on the first invalid
/// route.
pub fn check(table: &Table) -> Result<Vec<CheckLine>, TableError> {
    let router = table.router::<()>()?;
    Ok(table
        .signals
        .iter()
        .map(|s| match router.route(&s.ty, &()) {
            Ok(ts) => CheckLine::Targets { ty: s.ty.clone(), targets: ts.into_iter().cloned().collect() },
            Err(NoMatch { .. }) => CheckLine::Error { ty: s.ty.clone(), error: "no_match".into() },
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::PathError;

    #[test]
    fn the_issue_example_checks() {
        let text = r#"{"routes":[{"path":"user.**","target":"audit","priority":10},
                       {"path":"user.*.created","target":["welcome","crm"]}],
                      "signals":[{"type":"user.1.created"},{"type":"x"}]}"#;
        let lines = check(&Table::parse(text, Format::Json).unwrap()).unwrap();
        let json: Vec<String> = lines.iter().map(|l| serde_json::to_string(l).unwrap()).collect();
        assert_eq!(
            json,
            [r#"{"type":"user.1.created","targets":["welcome","crm","audit"]}"#, r#"{"type":"x","error":"no_match"}"#]
        );
    }

    #[test]
    fn toml_tables_work_too() {
        let text = "[[routes]]\npath = \"a.*\"\ntarget = \"t\"\n[[signals]]\ntype = \"a.b\"\n";
        let lines = check(&Table::parse(text, Format::Toml).unwrap()).unwrap();
        assert_eq!(lines, [CheckLine::Targets { ty: "a.b".into(), targets: vec!["t".into()] }]);
        let text = r#"{"routes":[{"path":"a","target":[{"log":{}},"n"]}],"signals":[{"type":"a"}]}"#;
        let line = serde_json::to_string(&check(&Table::parse(text, Format::Json).unwrap()).unwrap()[0]).unwrap();
        assert_eq!(line, r#"{"type":"a","targets":[{"log":{}},"n"]}"#);
    }

    #[test]
    fn invalid_tables_name_the_route_and_reason() {
        let text = r#"{"routes":[{"path":"ok","target":"t"},{"path":"a..b","target":"t"}]}"#;
        let err = check(&Table::parse(text, Format::Json).unwrap()).unwrap_err();
        assert_eq!(
            err,
            TableError::Route {
                index: 1,
                error: RouteError::Path { path: "a..b".into(), reason: PathError::EmptySegment { index: 1 } }
            }
        );
        assert!(err.to_string().contains("a..b"), "{err}");
        let err = Table::parse(r#"{"routes":[{"path":"a","target":"t","prio":1}]}"#, Format::Json).unwrap_err();
        assert!(matches!(err, TableError::Parse(ref m) if m.contains("prio")), "{err}");
    }
}
