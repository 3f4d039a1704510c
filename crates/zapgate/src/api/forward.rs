//! On a shared database any node answers any instance route: a call for an instance
//! another node runs is checked here (the same credentials, counted against the same
//! caller) and then passed to that node, its answer streamed back unchanged. A call
//! is passed once at most: the node it reaches answers it or says to try again.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{FromRequestParts as _, OriginalUri, Request, State};
use axum::http::{HeaderMap, HeaderName, StatusCode, header};
use axum::middleware::Next;
use axum::response::sse::Event as Sse;
use axum::response::{IntoResponse, Response};
use futures_util::Stream;

use super::{ApiError, AppState, BODY_LIMIT};
use crate::store::leases::Leases;
use crate::store::{InstanceRecord, StoreError};

/// Marks a call passed on by another node (the value: that node's id).
const FORWARDED_BY: HeaderName = HeaderName::from_static("x-zapgate-forwarded-by");
/// How long a caller waits before trying again while an instance moves between nodes.
const MOVING_RETRY: std::time::Duration = std::time::Duration::from_secs(1);
/// How often a call waiting on another node checks that the node still holds the
/// instance.
const OWNER_LOOK: std::time::Duration = std::time::Duration::from_secs(1);
/// Longest wait for the owner node to accept a connection.
const CONNECT_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// This node's place among the nodes of a shared database.
pub struct Cluster {
    pub leases: Arc<Leases>,
    client: reqwest::Client,
}

impl Cluster {
    pub fn new(leases: Arc<Leases>) -> Self {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .connect_timeout(CONNECT_WAIT)
            .build()
            .expect("an HTTP client for the other nodes");
        Self { leases, client }
    }
}

/// Runs an instance route here when this node runs the instance; passes it to the
/// node that does otherwise.
pub(super) async fn to_owner(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let Some(cluster) = &state.cluster else {
        return next.run(request).await;
    };
    let (mut parts, body) = request.into_parts();
    let id = path_param(&mut parts, &state, "id").await;
    let local = id.as_ref().is_none_or(|id| state.manager.get(id).is_some());
    if local {
        return next.run(Request::from_parts(parts, body)).await;
    }
    let id = id.expect("looked at above");
    let record = match state.store.instance(&id).await {
        Ok(record) => record,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let record = match super::auth::verify_instance(
        &mut parts,
        &state,
        |_| record.filter(|r: &InstanceRecord| r.cancelled_at.is_none()),
        |r| &r.token,
    )
    .await
    {
        Ok(record) => record,
        Err(e) => return e.into_response(),
    };
    here_or_owner(&state, cluster, &record.id, parts, body, next).await
}

/// Runs a panel route about an instance here when this node runs it; passes it to the
/// node that does otherwise. The panel's session is in the database: it is checked
/// here, and again where the call is run.
pub(super) async fn panel_to_owner(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let Some(cluster) = &state.cluster else {
        return next.run(request).await;
    };
    let (mut parts, body) = request.into_parts();
    let id = path_param(&mut parts, &state, "id").await;
    let elsewhere = match id {
        Some(id) if state.manager.get(&id).is_none() => Some(id),
        _ => None,
    };
    let Some(id) = elsewhere else {
        return next.run(Request::from_parts(parts, body)).await;
    };
    // Signed out: answered here, as anywhere.
    if super::panel::signed_in(&mut parts, &state).await.is_err() {
        return next.run(Request::from_parts(parts, body)).await;
    }
    match state.store.instance(&id).await {
        Ok(Some(record)) if record.cancelled_at.is_none() => {
            here_or_owner(&state, cluster, &record.id, parts, body, next).await
        }
        // No such instance: answered here too.
        Ok(_) => next.run(Request::from_parts(parts, body)).await,
        Err(e) => ApiError::from(e).into_response(),
    }
}

/// Runs a checked call about `instance` here if this node runs it (created here a
/// moment ago, or taken over since the first look), or passes it to the node that does.
async fn here_or_owner(
    state: &AppState,
    cluster: &Cluster,
    instance: &str,
    parts: axum::http::request::Parts,
    body: axum::body::Body,
    next: Next,
) -> Response {
    if state.manager.get(instance).is_some() {
        return next.run(Request::from_parts(parts, body)).await;
    }
    if parts.headers.contains_key(&FORWARDED_BY) {
        // The node that passed it believed this one runs it: it moved meanwhile.
        // Never passed twice.
        return moving();
    }
    to_node_of(cluster, instance, parts, body).await
}

/// Runs a link page's route here when this node runs the page's instance; passes it to
/// the node that does otherwise. The page's token is its only credential: the node that
/// runs the instance checks it, and answers for a page that is not live.
pub(super) async fn page_to_owner(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let Some(cluster) = &state.cluster else {
        return next.run(request).await;
    };
    let (mut parts, body) = request.into_parts();
    let token = path_param(&mut parts, &state, "token").await;
    let page = match token {
        Some(token) => match state.store.link_page(&super::link_page::hash(&token)).await {
            Ok(page) => page,
            Err(e) => return ApiError::from(e).into_response(),
        },
        None => None,
    };
    let elsewhere = page
        .filter(|page| state.manager.get(&page.instance_id).is_none())
        .filter(|_| !parts.headers.contains_key(&FORWARDED_BY));
    match elsewhere {
        Some(page) => to_node_of(cluster, &page.instance_id, parts, body).await,
        // Here, unknown, or passed here already: answered here.
        None => next.run(Request::from_parts(parts, body)).await,
    }
}

/// Passes a call about `instance` to the node holding it, or says it is moving.
async fn to_node_of(
    cluster: &Cluster,
    instance: &str,
    parts: axum::http::request::Parts,
    body: axum::body::Body,
) -> Response {
    match cluster.leases.owner_addr(instance).await {
        Ok(Some(addr)) => pass(cluster, &addr, instance, parts, body).await,
        // No node holds it this moment: one is taking it over.
        Ok(None) => moving(),
        Err(e) => ApiError::from(e).into_response(),
    }
}

/// The path parameter `name` of a call, if its path parses.
async fn path_param(
    parts: &mut axum::http::request::Parts,
    state: &AppState,
    name: &str,
) -> Option<String> {
    axum::extract::Path::<HashMap<String, String>>::from_request_parts(parts, state)
        .await
        .ok()
        .and_then(|p| p.0.get(name).cloned())
}

/// Whether the call was passed here by another node.
pub(super) fn passed(headers: &HeaderMap) -> bool {
    headers.contains_key(&FORWARDED_BY)
}

/// How long a call asked of every node waits for each one.
#[derive(Clone, Copy)]
pub(super) enum Wait {
    /// For the whole answer.
    Answer(std::time::Duration),
    /// For the answer to begin (a stream then lasts).
    Start(std::time::Duration),
}

/// The same GET asked of every other live node, with the caller's headers and marked as
/// passed on: the addresses of the nodes asked, and the 200 answers of those that gave
/// one in time (a paused node takes the connection and says nothing).
pub(super) async fn ask_others(
    cluster: &Cluster,
    headers: &HeaderMap,
    path: &str,
    wait: Wait,
) -> Result<(Vec<String>, Vec<(String, reqwest::Response)>), StoreError> {
    let asked: Vec<String> = cluster
        .leases
        .others()
        .await?
        .into_iter()
        .map(|(_, addr)| addr)
        .collect();
    let calls = asked.iter().map(|addr| {
        let mut call = cluster.client.get(format!("{addr}{path}"));
        for (name, value) in headers.iter().filter(|(n, _)| !hop_by_hop(n)) {
            call = call.header(name, value);
        }
        let start = match wait {
            Wait::Answer(wait) => {
                call = call.timeout(wait);
                wait
            }
            Wait::Start(wait) => wait,
        };
        let sent = call.header(FORWARDED_BY, cluster.leases.id()).send();
        async move {
            let Ok(sent) = tokio::time::timeout(start, sent).await else {
                tracing::warn!(node.addr = %addr, "another node did not answer a call passed to it in time");
                return None;
            };
            match sent {
                Ok(answer) if answer.status() == StatusCode::OK => Some((addr.clone(), answer)),
                Ok(answer) => {
                    tracing::warn!(node.addr = %addr, status = %answer.status(), "another node refused a call passed to it");
                    None
                }
                Err(e) => {
                    tracing::warn!(node.addr = %addr, error = %e, "another node did not answer a call passed to it");
                    None
                }
            }
        }
    });
    let answers = futures_util::future::join_all(calls).await;
    Ok((asked, answers.into_iter().flatten().collect()))
}

/// How often a stream merged from every node looks at which nodes are live.
const NODES_LOOK: std::time::Duration = std::time::Duration::from_secs(5);
/// How long a stream merged from every node waits for each to begin.
const STREAM_START: std::time::Duration = std::time::Duration::from_secs(3);
/// How long a stream merged without some node (it did not answer, or refused) lasts
/// before it ends, so that the reader tries every node again.
const WITHOUT_SOME: std::time::Duration = std::time::Duration::from_secs(30);

/// The events of `local` merged with those of the same stream on every other live node.
/// The merged stream ends when one of those ends, and when the live nodes are no longer
/// those it asked (one joined or left): the reader then reconnects, and reads what it
/// shows again. Without a node that did not answer, it ends after a while too.
pub(super) async fn with_others<S>(
    cluster: &Cluster,
    headers: &HeaderMap,
    path: &str,
    local: S,
) -> Result<impl Stream<Item = Sse> + Send + 'static, StoreError>
where
    S: Stream<Item = Sse> + Send + 'static,
{
    use futures_util::StreamExt as _;
    let (mut asked, answers) =
        ask_others(cluster, headers, path, Wait::Start(STREAM_START)).await?;
    asked.sort();
    let partial = (answers.len() < asked.len()).then(|| tokio::time::Instant::now() + WITHOUT_SOME);
    let leases = cluster.leases.clone();
    let nodes_changed = futures_util::stream::once(async move {
        loop {
            tokio::time::sleep(NODES_LOOK).await;
            if partial.is_some_and(|until| tokio::time::Instant::now() >= until) {
                return None;
            }
            if let Ok(others) = leases.others().await {
                let mut now: Vec<String> = others.into_iter().map(|(_, addr)| addr).collect();
                now.sort();
                if now != asked {
                    return None;
                }
            }
        }
    });
    let mut all = vec![local.map(Some).boxed(), nodes_changed.boxed()];
    all.extend(
        answers
            .into_iter()
            .map(|(_, answer)| super::events::read_events(answer).boxed()),
    );
    Ok(futures_util::stream::select_all(all)
        .take_while(|event| std::future::ready(event.is_some()))
        .filter_map(std::future::ready))
}

fn moving() -> Response {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "The instance is moving to another gateway node; try again in a moment",
    )
    .retry_after(MOVING_RETRY)
    .into_response()
}

/// The node an answer streams from, and the instance it was asked about.
#[derive(Clone)]
struct OwnerWatch {
    leases: Arc<Leases>,
    instance: String,
    addr: String,
}

impl OwnerWatch {
    /// Whether that node still holds the instance (a failed look counts as yes).
    async fn still_there(&self) -> bool {
        match self.leases.owner_addr(&self.instance).await {
            Ok(owner) => owner.as_deref() == Some(self.addr.as_str()),
            Err(_) => true,
        }
    }
}

/// Headers of one connection, never passed on (RFC 9110, 7.6.1).
fn hop_by_hop(name: &HeaderName) -> bool {
    [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::TE,
        header::TRAILER,
        header::UPGRADE,
        header::PROXY_AUTHORIZATION,
        header::HOST,
        header::CONTENT_LENGTH,
    ]
    .contains(name)
        || name.as_str() == "keep-alive"
        || name.as_str() == "proxy-connection"
}

/// Passes the call to the node at `addr`, and its answer back as it comes (an event
/// stream stays a stream).
async fn pass(
    cluster: &Cluster,
    addr: &str,
    instance: &str,
    parts: axum::http::request::Parts,
    body: axum::body::Body,
) -> Response {
    let Ok(body) = axum::body::to_bytes(body, BODY_LIMIT).await else {
        return ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "The request body is too large",
        )
        .into_response();
    };
    // The route as the caller named it (a nested router sees only its own part).
    let uri = parts
        .extensions
        .get::<OriginalUri>()
        .map_or(&parts.uri, |original| &original.0);
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let mut call = cluster
        .client
        .request(parts.method.clone(), format!("{addr}{path}"));
    for (name, value) in parts.headers.iter().filter(|(n, _)| !hop_by_hop(n)) {
        call = call.header(name, value);
    }
    let sent = call
        .header(FORWARDED_BY, cluster.leases.id())
        .body(body)
        .send();
    tokio::pin!(sent);
    // A node that stopped (paused, cut off) may take the call and never answer: while
    // waiting, the lease is looked at each second, and once it moved the caller is
    // told to try again (it reaches the new owner then).
    let sent = loop {
        tokio::select! {
            sent = &mut sent => break sent,
            () = tokio::time::sleep(OWNER_LOOK) => {
                match cluster.leases.owner_addr(instance).await {
                    Ok(Some(owner)) if owner == addr => {}
                    Ok(_) => return moving(),
                    // The owner may still answer: the call is not given up for a
                    // failed look.
                    Err(e) => tracing::warn!(error = %e, "could not look up an instance's node"),
                }
            }
        }
    };
    let answer = match sent {
        Ok(answer) => answer,
        Err(e) => {
            tracing::warn!(node.addr = %addr, error = %e, "the node running an instance did not answer a call passed to it");
            return ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "The gateway node running this instance did not answer; try again in a moment",
            )
            .retry_after(MOVING_RETRY)
            .into_response();
        }
    };
    let mut response = Response::builder().status(answer.status());
    for (name, value) in answer.headers().iter().filter(|(n, _)| !hop_by_hop(n)) {
        response = response.header(name, value);
    }
    // A failure mid-way ends the body as a failure (the caller sees it cut). A long
    // answer (an event stream) also ends once the instance moved: its owner may be
    // paused, and the caller reconnects to the new one.
    let watch = OwnerWatch {
        leases: cluster.leases.clone(),
        instance: instance.to_owned(),
        addr: addr.to_owned(),
    };
    let chunks = futures_util::stream::unfold(Some(answer), move |answer| {
        let watch = watch.clone();
        async move {
            let mut answer = answer?;
            loop {
                tokio::select! {
                    chunk = answer.chunk() => return match chunk {
                        Ok(Some(chunk)) => Some((Ok::<_, reqwest::Error>(chunk), Some(answer))),
                        Ok(None) => None,
                        Err(e) => Some((Err(e), None)),
                    },
                    () = tokio::time::sleep(OWNER_LOOK) => {
                        if !watch.still_there().await {
                            return None;
                        }
                    }
                }
            }
        }
    });
    response
        .body(axum::body::Body::from_stream(chunks))
        .unwrap_or_else(|_| StatusCode::BAD_GATEWAY.into_response())
}
