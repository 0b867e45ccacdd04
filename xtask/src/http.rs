//! A minimal HTTP/1.0 client for talking to wgtrace's exporter and to
//! Prometheus from tests and tasks, without pulling an HTTP stack in.

use anyhow::{Context as _, Result};

/// A plain HTTP/1.0 response: status code, Content-Type, body.
pub struct HttpResponse {
    pub status: u16,
    pub content_type: String,
    pub body: String,
}

/// `GET path` from `address` over HTTP/1.0, with an optional Accept header.
pub fn get(address: &str, path: &str, accept: Option<&str>) -> Result<HttpResponse> {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(address).with_context(|| format!("connecting to {address}"))?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    let accept = accept.map(|a| format!("Accept: {a}\r\n")).unwrap_or_default();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {address}\r\n{accept}Connection: close\r\n\r\n")?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let response = String::from_utf8(response).context("a response that is not UTF-8")?;
    let (head, body) = response.split_once("\r\n\r\n").context("a response without headers")?;
    let mut lines = head.lines();
    let status = lines.next().and_then(|l| l.split_whitespace().nth(1)).and_then(|s| s.parse().ok()).unwrap_or(0);
    let content_type = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.eq_ignore_ascii_case("content-type"))
        .map(|(_, value)| value.trim().to_owned())
        .unwrap_or_default();
    Ok(HttpResponse { status, content_type, body: body.to_owned() })
}
