//! What one caller may take: failed authentications per address, and event streams
//! open at once (in all, and per instance or link page).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::StatusCode;
use axum::http::request::Parts;

use super::{ApiError, AppState};
use crate::config::Network;

/// Addresses remembered at most; past it, those that have nothing left to count are
/// forgotten first.
const MAX_ADDRESSES: usize = 100_000;

/// Failed authentications by source address, as a bucket per address: `per_minute`
/// failures at once, one more every `60 / per_minute` seconds. An address whose bucket
/// is empty is refused before its credentials are even compared, so guessing from it
/// stops until the bucket refills, right guesses included.
pub struct FailedAuth {
    per_minute: u32,
    /// The buckets, and when the full table was last pruned.
    buckets: Mutex<(HashMap<IpAddr, Bucket>, Option<Instant>)>,
}

#[derive(Clone, Copy)]
struct Bucket {
    /// Failures still allowed, as of `at`.
    left: f64,
    at: Instant,
}

/// An address over its limit, and how long until it may try again.
#[derive(Debug)]
pub struct TooManyFailures(Duration);

impl TooManyFailures {
    pub fn secs(&self) -> u64 {
        crate::instance::whole_seconds(self.0)
    }

    pub fn message(&self) -> String {
        format!(
            "Too many failed authentications from your address; try again in {} s",
            self.secs()
        )
    }
}

impl From<TooManyFailures> for ApiError {
    fn from(refused: TooManyFailures) -> Self {
        ApiError::new(StatusCode::TOO_MANY_REQUESTS, refused.message()).retry_after(refused.0)
    }
}

impl FailedAuth {
    pub fn new(per_minute: u32) -> Self {
        Self {
            per_minute: per_minute.max(1),
            buckets: Mutex::new((HashMap::new(), None)),
        }
    }

    fn refill_every(&self) -> Duration {
        Duration::from_secs(60) / self.per_minute
    }

    fn refilled(&self, bucket: Bucket, now: Instant) -> Bucket {
        let gained =
            now.duration_since(bucket.at).as_secs_f64() / self.refill_every().as_secs_f64();
        Bucket {
            left: (bucket.left + gained).min(f64::from(self.per_minute)),
            at: now,
        }
    }

    /// Runs `authenticate` for a caller from `address`, unless the address is over its
    /// limit; counts it when it fails. One lock around both, so callers at once can
    /// never fail more often than the limit allows.
    pub fn verify<T, E>(
        &self,
        address: IpAddr,
        authenticate: impl FnOnce() -> Result<T, E>,
    ) -> Result<Result<T, E>, TooManyFailures> {
        self.verify_at(
            crate::server::address_key(address),
            Instant::now(),
            authenticate,
        )
    }

    fn verify_at<T, E>(
        &self,
        address: IpAddr,
        now: Instant,
        authenticate: impl FnOnce() -> Result<T, E>,
    ) -> Result<Result<T, E>, TooManyFailures> {
        let mut guard = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let (buckets, pruned) = &mut *guard;
        let bucket = buckets.get(&address).map(|b| self.refilled(*b, now));
        if let Some(bucket) = bucket.filter(|b| b.left < 1.0) {
            return Err(TooManyFailures(
                self.refill_every().mul_f64(1.0 - bucket.left),
            ));
        }
        let outcome = authenticate();
        if outcome.is_err() {
            let full = f64::from(self.per_minute);
            if bucket.is_none() && buckets.len() >= MAX_ADDRESSES {
                // Forget those that have nothing left to count, at most once a second;
                // while it stays full, a new address is not counted.
                if pruned.is_none_or(|at| now.duration_since(at) >= Duration::from_secs(1)) {
                    buckets.retain(|_, b| self.refilled(*b, now).left < full);
                    *pruned = Some(now);
                }
                if buckets.len() >= MAX_ADDRESSES {
                    return Ok(outcome);
                }
            }
            let mut bucket = bucket.unwrap_or(Bucket {
                left: full,
                at: now,
            });
            bucket.left = (bucket.left - 1.0).max(0.0);
            buckets.insert(address, bucket);
        }
        Ok(outcome)
    }
}

/// The address a request came from: the connection's peer (unspecified when the
/// router is called without a server, as in unit tests), or, when the peer is a
/// trusted proxy, the nearest address in `X-Forwarded-For` that is not one.
pub(super) struct Peer(pub(super) IpAddr);

impl FromRequestParts<AppState> for Peer {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map_or(IpAddr::from([0, 0, 0, 0]), |c| c.0.ip());
        Ok(Peer(client_of(
            peer,
            &parts.headers,
            &state.trusted_proxies,
        )))
    }
}

/// Who a request from `peer` is for: `peer` itself unless it is a trusted proxy; then,
/// reading `X-Forwarded-For` from the right (each proxy appends who it heard from),
/// the first address that is not a trusted proxy. A header that does not parse counts
/// as the proxy itself.
fn client_of(peer: IpAddr, headers: &axum::http::HeaderMap, trusted: &[Network]) -> IpAddr {
    let is_trusted = |address: IpAddr| trusted.iter().any(|n| n.contains(address));
    if !is_trusted(peer) {
        return peer;
    }
    let forwarded: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .collect();
    let mut client = peer;
    for hop in forwarded.iter().rev() {
        match hop.trim().parse::<IpAddr>() {
            Ok(address) => {
                client = address;
                if !is_trusted(address) {
                    break;
                }
            }
            Err(_) => return peer,
        }
    }
    client
}

/// When a caller refused a stream is told to try again.
const STREAM_RETRY: Duration = Duration::from_secs(10);

/// Event streams open at once: in all, and per key (an instance, a link page).
#[derive(Debug)]
pub struct StreamSlots {
    total: usize,
    per_key: usize,
    open: Mutex<(usize, HashMap<String, usize>)>,
}

/// One open stream; its slot is given back when it is dropped (the stream ended).
#[derive(Debug)]
pub struct StreamSlot {
    slots: Arc<StreamSlots>,
    key: String,
}

impl StreamSlots {
    pub fn new(total: usize, per_key: usize) -> Arc<Self> {
        Arc::new(Self {
            total,
            per_key,
            open: Mutex::new((0, HashMap::new())),
        })
    }

    /// A slot for a stream of `key`, or the 429 the caller gets.
    pub fn take(self: &Arc<Self>, key: &str) -> Result<StreamSlot, ApiError> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let of_key = open.1.get(key).copied().unwrap_or(0);
        let refused = if open.0 >= self.total {
            Some("The gateway has as many event streams open as it allows; try again later")
        } else if of_key >= self.per_key {
            Some("Too many event streams are open for this; close one and try again")
        } else {
            None
        };
        if let Some(message) = refused {
            return Err(
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, message).retry_after(STREAM_RETRY)
            );
        }
        open.0 += 1;
        open.1.insert(key.to_owned(), of_key + 1);
        Ok(StreamSlot {
            slots: self.clone(),
            key: key.to_owned(),
        })
    }

    /// Streams open now, in all.
    pub fn open(&self) -> usize {
        self.open.lock().unwrap_or_else(|e| e.into_inner()).0
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = self.slots.open.lock().unwrap_or_else(|e| e.into_inner());
        open.0 = open.0.saturating_sub(1);
        if let Some(n) = open.1.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                open.1.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_is_refused_once_its_failures_are_spent_and_again_allowed_as_they_refill() {
        let limit = FailedAuth::new(3);
        let (a, b) = ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
        let t0 = Instant::now();
        let wrong = || Err::<(), ()>(());
        for _ in 0..3 {
            assert!(matches!(limit.verify_at(a, t0, wrong), Ok(Err(()))));
        }
        // Refused without even trying: a right guess is not told.
        let mut tried = false;
        let refused = limit.verify_at(a, t0, || {
            tried = true;
            Ok::<(), ()>(())
        });
        let TooManyFailures(wait) = refused.unwrap_err();
        assert_eq!(wait, Duration::from_secs(20));
        assert!(!tried);
        // Others are not held back, and a success counts nothing.
        assert!(matches!(
            limit.verify_at(b, t0, || Ok::<(), ()>(())),
            Ok(Ok(()))
        ));
        // One failure refills every 20 s.
        let later = |secs| t0 + Duration::from_secs(secs);
        assert!(limit.verify_at(a, later(19), wrong).is_err());
        assert!(matches!(limit.verify_at(a, later(20), wrong), Ok(Err(()))));
        assert!(limit.verify_at(a, later(21), wrong).is_err());
    }

    #[test]
    fn behind_a_trusted_proxy_the_client_is_the_nearest_untrusted_forwarded_address() {
        let trusted: Vec<Network> = vec!["10.0.0.0/8".parse().unwrap()];
        let headers = |value: &str| {
            let mut headers = axum::http::HeaderMap::new();
            headers.insert("x-forwarded-for", value.parse().unwrap());
            headers
        };
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let proxy = ip("10.0.0.5");
        // What the client wrote itself (the leftmost) is never believed over a hop.
        let forwarded = headers("203.0.113.9, 198.51.100.7, 10.0.0.2");
        assert_eq!(client_of(proxy, &forwarded, &trusted), ip("198.51.100.7"));
        // Not from a proxy: the header is the caller's own word, ignored.
        assert_eq!(
            client_of(ip("192.0.2.1"), &forwarded, &trusted),
            ip("192.0.2.1")
        );
        assert_eq!(client_of(proxy, &headers("junk"), &trusted), proxy);
        assert_eq!(
            client_of(proxy, &axum::http::HeaderMap::new(), &trusted),
            proxy
        );
    }

    #[test]
    fn stream_slots_are_bounded_in_all_and_per_key_and_come_back_when_dropped() {
        let slots = StreamSlots::new(3, 2);
        let a1 = slots.take("a").unwrap();
        let _a2 = slots.take("a").unwrap();
        assert_eq!(
            slots.take("a").unwrap_err().status(),
            StatusCode::TOO_MANY_REQUESTS
        );
        let _b1 = slots.take("b").unwrap();
        assert!(slots.take("c").is_err(), "three open in all");
        drop(a1);
        assert_eq!(slots.open(), 2);
        assert!(slots.take("c").is_ok());
    }
}
