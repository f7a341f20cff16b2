//! The console's page, script and style, embedded in the binary (no CDN:
//! the console works offline). Sources: `server/src/web/assets/`.

/// The single page.
pub const INDEX_HTML: &str = include_str!("assets/index.html");
/// The console's script (no dependencies).
pub const APP_JS: &str = include_str!("assets/app.js");
/// The console's style sheet.
pub const APP_CSS: &str = include_str!("assets/app.css");
