//! Rendering of diagnostics for people: the message, the file:line:col, the source line and a
//! caret under the offending token. Library crates return errors as data; only the CLI renders.

use shardc_ir::text::{Diagnostic, SourceMap};
use shardc_ir::verify::VerifyErrors;
use std::fmt::Write;
use std::path::Path;

/// `error: MESSAGE`, then the location and the source line with a caret line.
pub fn source_error(path: &Path, src: &str, line: usize, col: usize, len: usize, message: &str) -> String {
    let mut out = format!("error: {message}\n");
    let text = src.lines().nth(line.saturating_sub(1)).unwrap_or("");
    let num = line.to_string();
    let pad = " ".repeat(num.len());
    let _ = writeln!(out, "{pad}--> {}:{line}:{col}", path.display());
    let _ = writeln!(out, "{pad} |");
    let _ = writeln!(out, "{num} | {text}");
    let _ = write!(out, "{pad} | {}{}", " ".repeat(col.saturating_sub(1)), "^".repeat(len.max(1)));
    out
}

/// A parse diagnostic.
pub fn parse_error(path: &Path, src: &str, d: &Diagnostic) -> String {
    source_error(path, src, d.line, d.col, d.len, &d.message)
}

/// Every verifier error, each at the line that defines the offending node's value.
pub fn verify_errors(path: &Path, src: &str, g: &shardc_ir::Graph, map: &SourceMap, errs: &VerifyErrors) -> String {
    let mut out = Vec::new();
    for e in &errs.0 {
        let node = e.node.and_then(|i| g.nodes.get(i));
        let line = e.value.and_then(|v| map.value_lines.get(v.index())).copied();
        let message = match node {
            Some(n) if !n.outputs.is_empty() => {
                format!("`{}` defining `%{}`: {}", n.op.name(), g.name_of(n.output()), e.message)
            }
            Some(_) | None => e.message.clone(),
        };
        out.push(match line {
            Some(line) => {
                let text = src.lines().nth(line - 1).unwrap_or("");
                let col = text.len() - text.trim_start().len() + 1;
                source_error(path, src, line, col, text.trim().len(), &message)
            }
            _ if e.context.is_empty() => format!("error: {}\n --> {}", e.message, path.display()),
            _ => format!("error: {}\n --> {}\n    {}", e.message, path.display(), e.context),
        });
    }
    out.join("\n\n")
}

/// `1234567` -> `1,234,567`.
pub fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}
