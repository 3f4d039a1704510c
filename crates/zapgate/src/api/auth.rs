//! Extractors that authenticate: the operator's bearer token for partner routes, and
//! `{id}/{token}` plus the account's `Client-Token` for instance routes.

use std::collections::HashMap;

use axum::extract::{FromRequestParts, Path};
use axum::http::StatusCode;
use axum::http::request::Parts;
use subtle::ConstantTimeEq;

use super::limits::Peer;
use super::{ApiError, AppState};
use crate::instance::InstanceHandle;

/// Compares secrets in constant time, their lengths included (as digests).
pub(super) fn same(given: &[u8], expected: &[u8]) -> bool {
    use sha2::Digest as _;
    let (given, expected) = (sha2::Sha256::digest(given), sha2::Sha256::digest(expected));
    given.as_slice().ct_eq(expected.as_slice()).into()
}

/// The credentials of an `Authorization` value; the scheme is case-insensitive (RFC 9110).
fn bearer(value: &str) -> Option<&str> {
    let (scheme, credentials) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| credentials.trim())
}

/// The operator, proven by `Authorization: Bearer <admin token>`.
pub(super) struct Admin;

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let Peer(peer) = Peer::from_request_parts(parts, state)
            .await
            .unwrap_or_else(|e| match e {});
        let given = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer)
            .unwrap_or_default();
        state.failed_auth.verify(peer, || {
            if same(given.as_bytes(), state.admin_token.expose().as_bytes()) {
                Ok(Admin)
            } else {
                Err(ApiError::new(StatusCode::UNAUTHORIZED, "Unauthorized"))
            }
        })?
    }
}

/// The instance named by the path, when its token matches. Unknown ids and wrong
/// tokens get the same 404, after the same constant-time comparison.
pub(super) struct Instance(pub(super) InstanceHandle);

/// Compared against when the id is unknown, so both failures take the same path.
const NO_TOKEN: &str = "000000000000000000000000";

impl FromRequestParts<AppState> for Instance {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let manager = &state.manager;
        verify_instance(parts, state, |id| manager.get(id), |h| &h.record.token)
            .await
            .map(Instance)
    }
}

/// Checks an instance route's credentials (the account's `Client-Token`, then the
/// instance's token) against what `find` finds under the path's id. A failure counts
/// against the caller's address.
pub(super) async fn verify_instance<T>(
    parts: &mut Parts,
    state: &AppState,
    find: impl FnOnce(&str) -> Option<T>,
    token_of: impl Fn(&T) -> &str,
) -> Result<T, ApiError> {
    let Peer(peer) = Peer::from_request_parts(parts, state)
        .await
        .unwrap_or_else(|e| match e {});
    let client_token = parts.headers.get("client-token").cloned();
    let path = Path::<HashMap<String, String>>::from_request_parts(parts, state).await;
    // A failure of the credentials counts against the address; a path that does
    // not parse (the inner error) does not.
    state.failed_auth.verify(peer, || {
        // The account token first: without it nothing is revealed about instances.
        if let Some(expected) = &state.client_token {
            match &client_token {
                None => {
                    return Ok(Err(ApiError::new(
                        StatusCode::UNAUTHORIZED,
                        "null not allowed",
                    )));
                }
                Some(given) if same(given.as_bytes(), expected.expose().as_bytes()) => {}
                Some(_) => {
                    return Err(ApiError::new(
                        StatusCode::UNAUTHORIZED,
                        "Client-Token not allowed",
                    ));
                }
            }
        }
        let Ok(Path(params)) = &path else {
            return Ok(Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "The path is not valid UTF-8",
            )));
        };
        let (Some(id), Some(token)) = (params.get("id"), params.get("token")) else {
            return Err(ApiError::instance_not_found());
        };
        let found = find(id);
        let expected = found.as_ref().map_or(NO_TOKEN, &token_of);
        let token_matches = same(token.as_bytes(), expected.as_bytes());
        match found {
            Some(found) if token_matches => Ok(Ok(found)),
            _ => Err(ApiError::instance_not_found()),
        }
    })??
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        for value in ["Bearer t", "bearer t", "BEARER  t"] {
            assert_eq!(super::bearer(value), Some("t"), "{value}");
        }
        assert_eq!(super::bearer("Basic t"), None);
        assert_eq!(super::bearer("Bearert"), None);
    }
}
