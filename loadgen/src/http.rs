//! HTTP/1.1 keep-alive connections to the relay: one TCP connection, one request at a time.
//!
//! Built on hyper's low-level `client::conn::http1`, not its pooled `Client`: a load
//! generator must control exactly how many connections exist and which request goes on which
//! (`--connections 64` means 64 sockets), and a pool would open and reuse them as it likes.
//! hyper still does the parsing (Content-Length, chunked, close-delimited bodies).
//!
//! Owns the target address (`--url`), connecting, and classifying failures into the kinds
//! the report counts. Does not own what is sent (scenarios) or timeouts (callers wrap calls in
//! `tokio::time::timeout`, because what a timeout means differs: a lost publish vs. an
//! expected end of a long poll).

use std::net::{SocketAddr, ToSocketAddrs};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::header::{HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{Method, Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

/// Where the relay is: `http://host:port`.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// `host:port` as given, for `Host` and the WebSocket URL.
    pub authority: String,
    /// The `Host` header value, made once.
    host: HeaderValue,
}

#[derive(Debug, thiserror::Error)]
pub enum UrlError {
    #[error("--url must look like http://127.0.0.1:8080 (https is not supported): {0}")]
    Malformed(String),
    #[error("--url host {0} does not resolve: {1}")]
    Resolve(String, std::io::Error),
}

impl Endpoint {
    pub fn parse(url: &str) -> Result<Endpoint, UrlError> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| UrlError::Malformed(url.to_owned()))?;
        let authority = rest.trim_end_matches('/');
        if authority.is_empty() || authority.contains('/') || !authority.contains(':') {
            return Err(UrlError::Malformed(url.to_owned()));
        }
        let addr = authority
            .to_socket_addrs()
            .map_err(|e| UrlError::Resolve(authority.to_owned(), e))?
            .next()
            .ok_or_else(|| {
                UrlError::Resolve(authority.to_owned(), std::io::ErrorKind::NotFound.into())
            })?;
        let host =
            HeaderValue::from_str(authority).map_err(|_| UrlError::Malformed(url.to_owned()))?;
        Ok(Endpoint {
            addr,
            authority: authority.to_owned(),
            host,
        })
    }

    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.authority)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("request: {0}")]
    Request(#[from] hyper::http::Error),
}

impl HttpError {
    /// The failure kind as the report counts it.
    pub fn kind(&self) -> &'static str {
        match self {
            HttpError::Connect(_) => "connect",
            HttpError::Http(e) if e.is_incomplete_message() => "closed",
            HttpError::Http(e) if e.is_parse() => "bad_response",
            HttpError::Http(_) => "io",
            HttpError::Request(_) => "bad_request",
        }
    }
}

/// Connects a TCP socket with Nagle off: requests are small and sent whole, and waiting to
/// coalesce them would add up to 40 ms (delayed ACK) to every latency.
pub async fn connect_tcp(endpoint: &Endpoint) -> Result<TcpStream, std::io::Error> {
    let stream = TcpStream::connect(endpoint.addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// One keep-alive connection.
pub struct HttpConn {
    sender: SendRequest<Full<Bytes>>,
    /// hyper's connection driver; aborted when the connection is dropped so no task outlives
    /// its socket's owner.
    driver: JoinHandle<()>,
}

impl Drop for HttpConn {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

impl HttpConn {
    pub async fn connect(endpoint: &Endpoint) -> Result<HttpConn, HttpError> {
        let stream = connect_tcp(endpoint).await.map_err(HttpError::Connect)?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        let driver = tokio::spawn(async move {
            // Its error is the one the next request on this connection reports.
            let _ = conn.await;
        });
        Ok(HttpConn { sender, driver })
    }

    /// Whether the connection can take another request (the server did not close it).
    pub fn is_open(&self) -> bool {
        !self.sender.is_closed()
    }

    /// Sends one request and reads the whole response.
    pub async fn request(
        &mut self,
        endpoint: &Endpoint,
        method: Method,
        path: &str,
        body: Option<Bytes>,
        authorization: Option<&HeaderValue>,
    ) -> Result<(u16, Bytes), HttpError> {
        let response = self
            .send(endpoint, method, path, body, authorization, &[])
            .await?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await?.to_bytes();
        Ok((status, body))
    }

    /// Sends one request and returns the response with its body unread (a stream).
    pub async fn send(
        &mut self,
        endpoint: &Endpoint,
        method: Method,
        path: &str,
        body: Option<Bytes>,
        authorization: Option<&HeaderValue>,
        extra_headers: &[(&'static str, HeaderValue)],
    ) -> Result<Response<Incoming>, HttpError> {
        self.sender.ready().await?;
        let mut builder = Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, endpoint.host.clone());
        // JSON unless the caller names another type (a login form).
        if body.is_some() && !extra_headers.iter().any(|(n, _)| *n == "content-type") {
            builder = builder.header(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        }
        if let Some(auth) = authorization {
            builder = builder.header(AUTHORIZATION, auth.clone());
        }
        for (name, value) in extra_headers {
            builder = builder.header(*name, value.clone());
        }
        if extra_headers.is_empty() {
            builder = builder.header(ACCEPT, HeaderValue::from_static("application/json"));
        }
        let request = builder.body(Full::new(body.unwrap_or_default()))?;
        Ok(self.sender.send_request(request).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_to_an_address_and_authority() {
        let e = Endpoint::parse("http://127.0.0.1:8080/").expect("valid");
        assert_eq!(e.addr, "127.0.0.1:8080".parse().expect("addr"));
        assert_eq!(e.ws_url("/ws"), "ws://127.0.0.1:8080/ws");
        for bad in [
            "https://127.0.0.1:1",
            "127.0.0.1:1",
            "http://127.0.0.1",
            "http://127.0.0.1:1/x",
        ] {
            assert!(Endpoint::parse(bad).is_err(), "{bad}");
        }
    }
}
