//! `GET /console`: the gateway's own page, for a person with a browser and no Grafana.
//!
//! The page and everything it runs are compiled into the binary (`console/` in this
//! crate, uPlot vendored from the npm registry), so it works offline; its URLs are
//! relative, so it works under a proxy's path prefix. It holds no data: its script
//! reads the JSON routes (`/readyz`,
//! `/narrative/stats`, `/narrative/analytics`) and posts to `/narrative`, with the
//! tab's client key when `API_KEYS` is set. Loading it needs no key.
//!
//! Its Content-Security-Policy allows scripts, styles, images and requests from the
//! gateway itself and nothing else: no inline script or style, no `eval`, no frames.

use std::sync::{Arc, OnceLock};

use axum::extract::Path;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use sha2::{Digest, Sha256};

use super::ApiError;
use crate::app::AppState;

/// The console's policy, set by `security_headers` on answers marked [`Page`].
pub(super) const CONSOLE_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self'; connect-src 'self'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// Marks a console answer, for the finishing layer's headers.
#[derive(Debug, Clone, Copy)]
pub(super) struct Page;

/// A file of the page, compiled in.
struct Asset {
    name: &'static str,
    content_type: &'static str,
    bytes: &'static [u8],
}

const PAGE: Asset = Asset {
    name: "index.html",
    content_type: "text/html; charset=utf-8",
    bytes: include_bytes!("../../console/index.html"),
};

const ASSETS: &[Asset] = &[
    Asset {
        name: "console.js",
        content_type: "text/javascript; charset=utf-8",
        bytes: include_bytes!("../../console/console.js"),
    },
    Asset {
        name: "console.css",
        content_type: "text/css; charset=utf-8",
        bytes: include_bytes!("../../console/console.css"),
    },
    Asset {
        name: "icon.svg",
        content_type: "image/svg+xml",
        bytes: include_bytes!("../../console/icon.svg"),
    },
    Asset {
        name: "uPlot.iife.min.js",
        content_type: "text/javascript; charset=utf-8",
        bytes: include_bytes!("../../console/vendor/uPlot.iife.min.js"),
    },
    Asset {
        name: "uPlot.min.css",
        content_type: "text/css; charset=utf-8",
        bytes: include_bytes!("../../console/vendor/uPlot.min.css"),
    },
];

pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route(
            "/console",
            get(|headers: HeaderMap| async move { serve(&PAGE, &headers) }),
        )
        .route("/console/{asset}", get(asset))
}

async fn asset(Path(name): Path<String>, headers: HeaderMap) -> Result<Response, ApiError> {
    let asset = ASSETS
        .iter()
        .find(|asset| asset.name == name)
        .ok_or(ApiError::NoRoute)?;
    Ok(serve(asset, &headers))
}

/// An asset with a strong ETag, revalidated on every use (`no-cache`): a new binary's
/// page is never mixed with an old script, and an unchanged one costs a 304.
fn serve(asset: &Asset, headers: &HeaderMap) -> Response {
    let etag = etag(asset);
    // If-None-Match compares weakly (RFC 9110 13.1.2): a proxy that compressed the
    // asset may have sent the tag on as `W/"..."`.
    let ours = etag.to_str().unwrap_or_default();
    let matches = headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(|tag| tag.trim())
        .any(|tag| tag == "*" || tag.strip_prefix("W/").unwrap_or(tag) == ours);
    let mut response = if matches {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static(asset.content_type),
            )],
            asset.bytes,
        )
            .into_response()
    };
    let headers = response.headers_mut();
    headers.insert(header::ETAG, etag);
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response.extensions_mut().insert(Page);
    response
}

/// The asset's content digest, computed once per asset and process.
fn etag(asset: &Asset) -> HeaderValue {
    static TAGS: OnceLock<Vec<(&'static str, HeaderValue)>> = OnceLock::new();
    let tags = TAGS.get_or_init(|| {
        std::iter::once(&PAGE)
            .chain(ASSETS)
            .map(|asset| {
                let digest = Sha256::digest(asset.bytes);
                let hex: String = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
                let tag = HeaderValue::from_str(&format!("\"{hex}\""))
                    .unwrap_or_else(|_| HeaderValue::from_static("\"\""));
                (asset.name, tag)
            })
            .collect()
    });
    tags.iter()
        .find(|(name, _)| *name == asset.name)
        .map_or_else(|| HeaderValue::from_static("\"\""), |(_, tag)| tag.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page() -> &'static str {
        std::str::from_utf8(PAGE.bytes).expect("utf-8 page")
    }

    #[test]
    fn every_asset_the_page_names_is_served() {
        let named: Vec<&str> = page()
            .split("\"console/")
            .skip(1)
            .map(|rest| rest.split('"').next().unwrap_or_default())
            .collect();
        for name in [
            "console.js",
            "console.css",
            "uPlot.iife.min.js",
            "uPlot.min.css",
        ] {
            assert!(named.contains(&name), "the page does not load {name}");
        }
        for name in named {
            assert!(
                ASSETS.iter().any(|a| a.name == name),
                "{name} is not served"
            );
        }
    }

    #[test]
    fn the_page_has_no_inline_script_style_or_handler() {
        let page = page().to_ascii_lowercase();
        for script in page.split("<script").skip(1) {
            let tag = script.split('>').next().unwrap_or_default();
            assert!(tag.contains("src="), "inline script: <script{tag}>");
            assert!(script[tag.len()..].starts_with("></script>"), "script body");
        }
        assert!(!page.contains("<style"), "style element");
        // Attributes, after any whitespace: ` style=`, `\tonclick=`, ` onClick =`.
        let attributes = page
            .split(|c: char| c.is_ascii_whitespace())
            .filter(|word| !word.is_empty());
        for word in attributes {
            let name: String = word.chars().take_while(char::is_ascii_lowercase).collect();
            let is_attribute = word[name.len()..].starts_with('=');
            assert!(
                !(is_attribute && (name == "style" || name.starts_with("on"))),
                "inline {word}"
            );
        }
    }
}
