//! GraphiQL on `GET /graphql`, from vendored, pinned files compiled into the
//! binary (`assets/graphiql/README.md` says which and why): the page loads
//! nothing from outside the deployment, and its Content-Security-Policy lets
//! it load scripts and connect to this server only.

use axum::Router;
use axum::http::{HeaderValue, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;

/// Where the assets are served; versioned, so a new build is never mixed
/// with a cached old one.
const ASSETS: &str = "/assets/graphiql-3.8.3";

/// Scripts and connections from this origin only. Styles also inline:
/// GraphiQL's editor sets `<style>` elements of its own. No page may frame it.
const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
     img-src 'self' data:; font-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; \
     form-action 'none'";

const PAGE: &str = r#"<!doctype html>
<html lang="en">
  <head>
    <meta charset="utf-8">
    <meta name="viewport" content="width=device-width, initial-scale=1">
    <title>Aegis Webhooks — GraphiQL</title>
    <link rel="stylesheet" href="ASSETS/graphiql.min.css">
    <style>body { margin: 0; } #graphiql { height: 100vh; }</style>
  </head>
  <body>
    <div id="graphiql">Loading…</div>
    <script src="ASSETS/react.production.min.js"></script>
    <script src="ASSETS/react-dom.production.min.js"></script>
    <script src="ASSETS/graphiql.min.js"></script>
    <script src="ASSETS/init.js"></script>
  </body>
</html>
"#;

/// The page and its assets.
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    let asset = |body: &'static [u8], content_type: &'static str| {
        get(move || async move { asset_response(body, content_type) })
    };
    Router::new()
        .route(
            &format!("{ASSETS}/graphiql.min.js"),
            asset(include_bytes!("../assets/graphiql/graphiql.min.js"), "text/javascript"),
        )
        .route(
            &format!("{ASSETS}/graphiql.min.css"),
            asset(include_bytes!("../assets/graphiql/graphiql.min.css"), "text/css"),
        )
        .route(
            &format!("{ASSETS}/react.production.min.js"),
            asset(
                include_bytes!("../assets/graphiql/react.production.min.js"),
                "text/javascript",
            ),
        )
        .route(
            &format!("{ASSETS}/react-dom.production.min.js"),
            asset(
                include_bytes!("../assets/graphiql/react-dom.production.min.js"),
                "text/javascript",
            ),
        )
        .route(
            &format!("{ASSETS}/init.js"),
            asset(include_bytes!("../assets/graphiql/init.js"), "text/javascript"),
        )
}

/// `GET /graphql`.
pub async fn page() -> Response {
    let mut response = Html(PAGE.replace("ASSETS", ASSETS)).into_response();
    response.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    response
}

/// A vendored file: its type, never sniffed, cached for good (its path names
/// its version).
fn asset_response(body: &'static [u8], content_type: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=31536000, immutable"),
    );
    response
}
