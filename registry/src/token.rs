//! Bearer tokens (the Docker token protocol): the GET of a token from the realm a registry's
//! challenge names, with basic credentials when there are any — or the OAuth2 POST with an
//! identity token as the refresh token — and the token's lifetime.

use crate::credential::Credential;
use crate::error::{RegistryError, Result, error_text};
use crate::secret::Secret;
use reqwest::StatusCode;
use reqwest::header::AUTHORIZATION;
use std::time::{Duration, Instant};

/// The longest token lifetime believed (a hostile `expires_in` must not overflow a clock).
const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// One token request.
#[derive(Debug)]
pub(crate) struct TokenRequest<'a> {
    pub(crate) realm: &'a str,
    pub(crate) service: Option<&'a str>,
    /// The scope this client needs (`repository:<name>:pull[,push]`).
    pub(crate) scope: &'a str,
    /// The scope the challenge named, asked for too when it differs.
    pub(crate) challenge_scope: Option<&'a str>,
    pub(crate) credential: Option<&'a Credential>,
}

/// When a token that lives `expires_in` seconds (the spec's default: 60) is renewed: at 90 % of
/// its life, at most [`MAX_TOKEN_LIFETIME`] from `now`.
pub(crate) fn renew_at(now: Instant, expires_in: Option<u64>) -> Instant {
    let lifetime = Duration::from_secs(expires_in.unwrap_or(60).max(1)).min(MAX_TOKEN_LIFETIME);
    now + lifetime.mul_f64(0.9)
}

/// GETs a token from `req.realm` with `http`; `registry` names the registry in errors. A 401 or
/// 403 gives an empty token: "this credential is refused", and the chain moves on.
pub(crate) async fn fetch(
    http: &reqwest::Client,
    registry: &str,
    req: &TokenRequest<'_>,
) -> Result<(Secret, Option<Instant>)> {
    let TokenRequest { realm, service, scope, challenge_scope, credential } = *req;
    let mut query: Vec<(&str, &str)> = vec![("scope", scope)];
    if let Some(s) = challenge_scope.filter(|s| *s != scope) {
        query.push(("scope", s));
    }
    if let Some(s) = service {
        query.push(("service", s));
    }
    let req = match credential {
        // OAuth2 (the distribution token spec's POST form): the identity token is a refresh token.
        Some(c) if c.is_identity_token() => {
            let mut form: Vec<(&str, &str)> = vec![
                ("grant_type", "refresh_token"),
                ("refresh_token", c.password.expose()),
                ("client_id", "clip"),
                ("service", service.unwrap_or_default()),
            ];
            form.extend(query.iter().filter(|(k, _)| *k == "scope").copied());
            let body = url::form_urlencoded::Serializer::new(String::new()).extend_pairs(&form).finish();
            http.post(realm).header(reqwest::header::CONTENT_TYPE, "application/x-www-form-urlencoded").body(body)
        }
        Some(c) => http.get(realm).query(&query).header(AUTHORIZATION, c.basic_header()),
        None => http.get(realm).query(&query),
    };
    let transport = |e: reqwest::Error| RegistryError::Transport {
        registry: registry.to_string(),
        context: "token request".into(),
        message: error_text(&e),
    };
    let resp = req.send().await.map_err(transport)?;
    let status = resp.status();
    if !status.is_success() {
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            // Treated as "this credential is refused": an empty header makes the next
            // attempt move along the chain.
            return Ok((Secret::new(""), None));
        }
        return Err(RegistryError::Status {
            registry: registry.to_string(),
            method: if credential.is_some_and(Credential::is_identity_token) { "POST" } else { "GET" }.into(),
            path: "token realm".into(),
            status: status.as_u16(),
            body: String::new(),
        });
    }
    #[derive(serde::Deserialize)]
    struct TokenResponse {
        token: Option<String>,
        access_token: Option<String>,
        expires_in: Option<u64>,
    }
    let bad = |message: String| RegistryError::BadResponse {
        registry: registry.to_string(),
        what: "token response".into(),
        message,
    };
    let bytes = crate::body::read_capped(resp, crate::body::MAX_TOKEN_BODY).await.map_err(|e| match e {
        crate::body::BodyError::TooLarge { limit } => bad(format!("larger than {limit} bytes")),
        crate::body::BodyError::Transport(e) => transport(e),
    })?;
    // Only the position is told: serde's message may quote a value, and this one holds a token.
    let body: TokenResponse = serde_json::from_slice(&bytes).map_err(|e| {
        bad(format!("not a token answer ({:?} error at line {} column {})", e.classify(), e.line(), e.column()))
    })?;
    let token = body.token.or(body.access_token).ok_or_else(|| RegistryError::BadResponse {
        registry: registry.to_string(),
        what: "token response".into(),
        message: "no token".into(),
    })?;
    Ok((Secret::new(token), Some(renew_at(Instant::now(), body.expires_in))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hostile_lifetime_is_capped_instead_of_overflowing_the_clock() {
        let now = Instant::now();
        assert_eq!(renew_at(now, Some(u64::MAX)), now + MAX_TOKEN_LIFETIME.mul_f64(0.9));
        assert_eq!(renew_at(now, None), now + Duration::from_secs(54));
        assert_eq!(renew_at(now, Some(0)), now + Duration::from_millis(900));
    }

    /// A token realm on loopback that answers every request with `head` and then `chunks`
    /// chunks of 64 KiB of spaces (a hostile realm); returns its URL.
    async fn hostile_realm(head: &'static str, tail: &'static [u8], chunks: usize) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}/token", listener.local_addr().expect("addr"));
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = conn.read(&mut buf).await;
                    conn.write_all(head.as_bytes()).await?;
                    let mut chunk = format!("{:x}\r\n", 64 << 10).into_bytes();
                    chunk.extend_from_slice(&[b' '; 64 << 10]);
                    chunk.extend_from_slice(b"\r\n");
                    for _ in 0..chunks {
                        conn.write_all(&chunk).await?;
                    }
                    conn.write_all(format!("{:x}\r\n", tail.len()).as_bytes()).await?;
                    conn.write_all(tail).await?;
                    conn.write_all(b"\r\n0\r\n\r\n").await?;
                    std::io::Result::Ok(())
                });
            }
        });
        url
    }

    /// A realm that keeps the first request it gets and answers it with a token.
    async fn recording_realm() -> (String, tokio::sync::oneshot::Receiver<String>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}/token", listener.local_addr().expect("addr"));
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let Ok((mut conn, _)) = listener.accept().await else { return };
            let mut seen = Vec::new();
            let mut buf = [0u8; 4096];
            // Headers and a small form body arrive within a moment.
            while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(300), conn.read(&mut buf)).await {
                if n == 0 {
                    break;
                }
                seen.extend_from_slice(&buf[..n]);
            }
            let body = b"{\"access_token\":\"from-refresh\",\"expires_in\":300}";
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = conn.write_all(head.as_bytes()).await;
            let _ = conn.write_all(body).await;
            let _ = tx.send(String::from_utf8_lossy(&seen).into_owned());
        });
        (url, rx)
    }

    /// Seen before: an identity token in docker's `config.json` was dropped ("clip does not use").
    #[tokio::test]
    async fn an_identity_token_is_exchanged_as_an_oauth2_refresh_token() {
        let (realm, seen) = recording_realm().await;
        let credential = Credential::identity_token("IDENTITY-SENTINEL");
        let request = TokenRequest {
            realm: &realm,
            service: Some("registry.example"),
            scope: "repository:team/app:pull",
            challenge_scope: None,
            credential: Some(&credential),
        };
        let (token, _) = fetch(&reqwest::Client::new(), "reg", &request).await.expect("token");
        assert_eq!(token.expose(), "from-refresh");
        let seen = seen.await.expect("request");
        assert!(seen.starts_with("POST /token"), "{seen}");
        assert!(
            seen.contains("grant_type=refresh_token") && seen.contains("refresh_token=IDENTITY-SENTINEL"),
            "{seen}"
        );
        assert!(seen.contains("scope=repository%3Ateam%2Fapp%3Apull") && seen.contains("service=registry.example"));
        assert!(!seen.to_ascii_lowercase().contains("authorization:"), "sent as a password: {seen}");
    }

    const CHUNKED: &str =
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n";

    #[tokio::test]
    async fn a_token_answer_is_read_with_a_bound_and_its_content_never_quoted() {
        let http = reqwest::Client::new();
        let req = |realm| TokenRequest {
            realm,
            service: None,
            scope: "repository:a:pull",
            challenge_scope: None,
            credential: None,
        };
        // 1 GiB of chunked JSON whitespace: refused after 64 KiB.
        let realm = hostile_realm(CHUNKED, b"{\"token\":\"t\"}", 16 << 10).await;
        let e = fetch(&http, "reg", &req(&realm)).await.expect_err("endless token answer");
        assert!(e.to_string().contains("larger than"), "{e}");
        // A small answer with a hostile lifetime: accepted, its renewal within a day.
        let realm = hostile_realm(CHUNKED, b"{\"token\":\"t\",\"expires_in\":18446744073709551615}", 0).await;
        let (token, renew) = fetch(&http, "reg", &req(&realm)).await.expect("token");
        assert_eq!(token.expose(), "t");
        assert!(renew.expect("renewal") <= Instant::now() + MAX_TOKEN_LIFETIME);
        // A malformed answer: the error gives the position, not the value.
        let realm = hostile_realm(CHUNKED, b"{\"token\":\"t\",\"expires_in\":\"s3cr3t-value\"}", 0).await;
        let e = fetch(&http, "reg", &req(&realm)).await.expect_err("malformed");
        assert!(!e.to_string().contains("s3cr3t"), "{e}");
    }
}
