//! Answering a registry's challenges for one repository session: per endpoint host, the
//! credential chain walked on 401/403 (each candidate authenticated, then once more refreshed,
//! then the next), Bearer tokens fetched from the realm (the credential sent there only over
//! verified TLS or to the same host) and renewed before they expire. The request loop
//! (`client.rs`) asks [`Auth::current`] what to send and tells [`Auth::refused`] of a refusal.

use crate::answer::host_port;
use crate::challenge::Challenge;
use crate::credentials::{Candidate, CredentialChain, Source};
use crate::error::{RegistryError, Result, SourceList};
use crate::hosts::Endpoint;
use crate::reference::Reference;
use crate::secret::Secret;
use crate::token;
use std::collections::HashMap;
use std::time::Instant;

/// The auth of one repository session: its credential chain and what each host accepted.
pub(crate) struct Auth {
    image: Reference,
    chain: CredentialChain,
    /// Token scopes ask for push as well as pull (publishing).
    pub(crate) push: bool,
    state: tokio::sync::Mutex<AuthState>,
}

#[derive(Default)]
struct AuthState {
    /// Bumped on every change, so concurrent 401s re-authenticate once.
    generation: u64,
    /// Per endpoint host: where it is in the credential chain and what it last accepted. A
    /// mirror walks the chain on its own: its refusals never move the registry's position.
    hosts: HashMap<String, HostAuth>,
    logged: Option<Source>,
}

#[derive(Default)]
struct HostAuth {
    /// Index into the chain of the candidate in use for this host.
    candidate: usize,
    /// The `Authorization` value, its expiry and the challenge it answered.
    cached: Option<CachedAuth>,
}

struct CachedAuth {
    value: Secret,
    expires: Option<Instant>,
    challenge: Challenge,
}

/// One request's walk along the chain.
#[derive(Default)]
pub(crate) struct Walk {
    reauthed: bool,
    /// Candidates this request moved past: it gives up once it went round the whole chain
    /// (from wherever an earlier request on this host left it).
    moved: usize,
    tried: Vec<Source>,
}

/// What [`Auth::current`] says to send.
pub(crate) struct Current {
    pub(crate) authorization: Option<Secret>,
    generation: u64,
}

impl Auth {
    pub(crate) fn new(image: Reference, chain: CredentialChain) -> Self {
        Self { image, chain, push: false, state: tokio::sync::Mutex::new(AuthState::default()) }
    }

    pub(crate) fn chain(&self) -> &CredentialChain {
        &self.chain
    }

    /// The cached `Authorization` for `endpoint`, renewed first when its token expired.
    pub(crate) async fn current(&self, http: &reqwest::Client, endpoint: &Endpoint) -> Result<Current> {
        let mut state = self.state.lock().await;
        let (cached, candidate) = match state.hosts.get(&endpoint.host) {
            Some(h) => (h.cached.as_ref(), h.candidate),
            None => (None, 0),
        };
        let renew = cached
            .filter(|a| a.expires.is_some_and(|e| Instant::now() >= e))
            .map(|a| a.challenge.clone())
            .zip(self.chain.candidates.get(candidate).cloned());
        if let Some((challenge, candidate)) = renew {
            self.authenticate(http, &mut state, endpoint, &candidate, challenge, false).await?;
        }
        let authorization = state
            .hosts
            .get(&endpoint.host)
            .and_then(|h| h.cached.as_ref())
            .map(|a| a.value.clone())
            .filter(|v| !v.expose().is_empty());
        Ok(Current { authorization, generation: state.generation })
    }

    /// `endpoint` refused what [`Self::current`] gave (`status`, with this challenge if it sent
    /// one): authenticates, refreshes or moves along the chain, for the request to be sent
    /// again. An error once `walk` went round the chain (naming the sources it tried).
    pub(crate) async fn refused(
        &self,
        http: &reqwest::Client,
        endpoint: &Endpoint,
        sent: &Current,
        status: u16,
        fresh_challenge: Option<Challenge>,
        walk: &mut Walk,
    ) -> Result<()> {
        let mut state = self.state.lock().await;
        if state.generation != sent.generation {
            return Ok(()); // another request re-authenticated meanwhile; use its result
        }
        let chain_len = self.chain.candidates.len();
        let host = state.hosts.entry(endpoint.host.clone()).or_default();
        let known = host.cached.as_ref().map(|a| a.challenge.clone());
        let had_auth = known.is_some();
        let unauthorized = |tried: &[Source]| RegistryError::Unauthorized {
            registry: self.image.registry.clone(),
            repository: self.image.repository.clone(),
            status,
            tried: SourceList(tried.to_vec()),
        };
        let Some(challenge) = fresh_challenge.or(known) else {
            return Err(unauthorized(&walk.tried));
        };
        // First authenticate with the current candidate; then once more with it (a new
        // token, a re-minted credential); then move to the next candidate.
        let refresh = if !had_auth {
            false
        } else if !walk.reauthed {
            walk.reauthed = true;
            true
        } else {
            host.candidate = (host.candidate + 1) % chain_len.max(1);
            host.cached = None;
            walk.moved += 1;
            walk.reauthed = false;
            false
        };
        let candidate = self.chain.candidates.get(host.candidate).cloned();
        let Some(candidate) = candidate.filter(|_| walk.moved < chain_len) else {
            // Start over next time (a credential may be renewed meanwhile).
            host.candidate = 0;
            host.cached = None;
            state.generation += 1;
            return Err(unauthorized(&walk.tried));
        };
        if !walk.tried.contains(&candidate.source()) {
            walk.tried.push(candidate.source());
        }
        self.authenticate(http, &mut state, endpoint, &candidate, challenge, refresh).await
    }

    async fn authenticate(
        &self,
        http: &reqwest::Client,
        state: &mut AuthState,
        endpoint: &Endpoint,
        candidate: &Candidate,
        challenge: Challenge,
        refresh: bool,
    ) -> Result<()> {
        let source = candidate.source();
        let (credential, renew_at) = if endpoint.mirror {
            (candidate.resolve_for_mirror(&endpoint.host).await?, None)
        } else {
            match candidate.resolve(&self.image, refresh).await? {
                Some(r) => (Some(r.credential), r.renew_at),
                None => (None, None),
            }
        };
        if state.logged != Some(source) {
            tracing::info!(image = %self.image, source = source.name(), "{}", source.decision());
            state.logged = Some(source);
        }
        let (value, expires) = match &challenge {
            Challenge::Basic => match &credential {
                // An identity token is only ever exchanged at a token realm.
                Some(c) if !c.is_identity_token() => (Secret::new(c.basic_header()), None),
                _ => (Secret::new(""), None),
            },
            Challenge::Bearer { realm, service, scope } => {
                let (token, expires) = self
                    .fetch_token(http, endpoint, realm, service.as_deref(), scope.as_deref(), credential.as_ref())
                    .await?;
                // A refused token request gives no token: send nothing rather than `Bearer `.
                let value =
                    if token.expose().is_empty() { String::new() } else { format!("Bearer {}", token.expose()) };
                (Secret::new(value), expires)
            }
        };
        // Renewed before the credential it was made with runs out, not after a refusal.
        let expires = match (expires, renew_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        state.hosts.entry(endpoint.host.clone()).or_default().cached = Some(CachedAuth { value, expires, challenge });
        state.generation += 1;
        Ok(())
    }

    /// GET the token from a Bearer realm for this repository (pull, or pull and push).
    async fn fetch_token(
        &self,
        http: &reqwest::Client,
        endpoint: &Endpoint,
        realm: &str,
        service: Option<&str>,
        challenge_scope: Option<&str>,
        credential: Option<&crate::credentials::Credential>,
    ) -> Result<(Secret, Option<Instant>)> {
        let actions = if self.push { "pull,push" } else { "pull" };
        let scope = format!("repository:{}:{actions}", self.image.repository);
        // A realm on another host (another name or address; a port of the same one is the
        // same host) gets the credential only over verified TLS.
        let realm_url = url::Url::parse(realm).ok();
        let realm_host = realm_url.as_ref().and_then(host_port);
        let (endpoint_name, _) = crate::hosts::split_host_port(&endpoint.host);
        let same_host =
            realm_url.as_ref().and_then(url::Url::host_str).map(|h| h.trim_start_matches('[').trim_end_matches(']'))
                == Some(endpoint_name);
        let trusted = same_host || (realm_url.as_ref().is_some_and(|u| u.scheme() == "https") && !endpoint.skip_verify);
        let credential = if trusted {
            credential
        } else {
            if credential.is_some() {
                tracing::warn!(registry = %self.image.registry, realm = %realm_host.unwrap_or_default(), "the token realm is on another host without verified TLS: asking it anonymously");
            }
            None
        };
        let request = token::TokenRequest { realm, service, scope: &scope, challenge_scope, credential };
        token::fetch(http, &self.image.registry, &request).await
    }
}
