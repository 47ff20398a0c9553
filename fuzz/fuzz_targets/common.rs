//! Shared by the fuzz targets: an independent oracle for JSON nesting depth.

use serde_json::Value;

/// Nesting depth of arrays and objects (a scalar is 0).
pub fn depth_of(v: &Value) -> usize {
    match v {
        Value::Array(a) => 1 + a.iter().map(depth_of).max().unwrap_or(0),
        Value::Object(o) => 1 + o.values().map(depth_of).max().unwrap_or(0),
        _ => 0,
    }
}
