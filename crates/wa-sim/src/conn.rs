//! One task per websocket: handshake, registration or login, then stanzas both ways.
//! Anything malformed ends this connection only, with the reason logged.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket};
use buffa::Message as _;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, sleep_until, timeout};
use wacore::libsignal::protocol::PublicKey;
use wacore_binary::{Node, marshal::marshal};
use waproto::whatsapp as wa;

use crate::frame::{FrameError, FrameReader, encode_frame};
use crate::noise::{AfterHello, HandshakeError, Pattern, Transport};
use crate::registry::{Command, Companion, ConnId, Registration};
use crate::sim::{LoginRefusal, Sim, bump};
use crate::{iq, stanza};

#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    #[error("client payload: {0}")]
    Payload(String),
    #[error("stanza is not a valid binary node: {0}")]
    Node(#[from] wacore_binary::BinaryError),
    #[error("websocket: {0}")]
    Socket(#[from] axum::Error),
    #[error("text websocket messages are not part of the protocol")]
    TextMessage,
    #[error("timed out waiting for the client")]
    Timeout,
    #[error("closed by the client")]
    Closed,
}

/// Where a connection stands once its handshake is done.
pub(crate) enum Session {
    Linking,
    Device { phone: String, device: u32 },
}

pub(crate) struct Connection {
    pub(crate) sim: Arc<Sim>,
    socket: WebSocket,
    reader: FrameReader,
    transport: Option<Transport>,
    /// Answers awaited for iqs the service sent, by iq id.
    waiters: HashMap<String, oneshot::Sender<Node>>,
    pub(crate) id: ConnId,
    pub(crate) session: Session,
}

pub(crate) async fn serve(sim: Arc<Sim>, socket: WebSocket) {
    bump(&sim.stats.connections, 1);
    let mut conn = Connection {
        reader: FrameReader::new(sim.config.max_frame_bytes),
        sim: sim.clone(),
        socket,
        transport: None,
        waiters: HashMap::new(),
        id: 0,
        session: Session::Linking,
    };
    let (tx, rx) = mpsc::channel(32);
    match conn.run(tx, rx).await {
        Ok(()) | Err(ConnError::Closed) => {}
        Err(e) => {
            bump(&sim.stats.protocol_errors, 1);
            tracing::debug!(conn.id = conn.id, error = %e, "connection closed on error");
        }
    }
    if conn.id != 0 {
        sim.unregister(conn.id);
    }
    sim.stats
        .connections
        .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
}

impl Connection {
    async fn run(
        &mut self,
        tx: mpsc::Sender<Command>,
        mut rx: mpsc::Receiver<Command>,
    ) -> Result<(), ConnError> {
        let sim = self.sim.clone();
        let admitting = crate::sim::Admitting::begin(&sim.stats);
        let deadline = self.sim.config.handshake_timeout;
        let established = timeout(deadline, self.handshake())
            .await
            .map_err(|_| ConnError::Timeout)??;
        bump(&self.sim.stats.handshakes, 1);
        match established.pattern {
            Pattern::Ik => bump(&self.sim.stats.ik_handshakes, 1),
            Pattern::XxFallback => bump(&self.sim.stats.fallback_handshakes, 1),
            Pattern::Xx => {}
        }
        self.transport = Some(established.transport);
        let payload = wa::ClientPayload::decode_from_slice(&established.payload)
            .map_err(|e| ConnError::Payload(e.to_string()))?;
        if !self.admit(tx, &payload, &established.client_static).await? {
            return Ok(());
        }
        drop(admitting);
        self.serve_stanzas(&mut rx).await
    }

    async fn handshake(&mut self) -> Result<crate::noise::Established, ConnError> {
        let hello = self.next_raw_frame().await?;
        let (reply, next) = crate::noise::respond_to_hello(&self.sim.identity, &hello)?;
        self.send_raw(encode_frame(&reply)).await?;
        match next {
            AfterHello::Done(established) => Ok(established),
            AfterHello::AwaitFinish(pending) => {
                let finish = self.next_raw_frame().await?;
                Ok(pending.finish(&finish)?)
            }
        }
    }

    /// Registration (no stored session: show QR codes) or login of a linked device.
    /// Returns false when the connection is refused and should close.
    async fn admit(
        &mut self,
        tx: mpsc::Sender<Command>,
        payload: &wa::ClientPayload,
        client_static: &[u8; 32],
    ) -> Result<bool, ConnError> {
        if let Some(registration) = payload.device_pairing_data.as_option() {
            let companion = check_registration(registration, client_static)?;
            let refs = crate::fresh_refs(self.sim.config.refs_per_pairing);
            let pair_device = stanza::pair_device(&stanza::fresh_id(), &refs);
            self.id = self.sim.register_linking(tx, companion, refs);
            self.send_node(&pair_device).await?;
            return Ok(true);
        }
        let (Some(username), Some(device)) = (payload.username, payload.device) else {
            return Err(ConnError::Payload(
                "neither registration data nor username and device".into(),
            ));
        };
        let phone = username.to_string();
        match self.sim.login(tx, &phone, device, client_static) {
            Ok((id, lid)) => {
                self.id = id;
                bump(&self.sim.stats.logins, 1);
                self.send_node(&stanza::success(&lid, device)).await?;
                self.session = Session::Device { phone, device };
                Ok(true)
            }
            Err(LoginRefusal::Unknown) => {
                bump(&self.sim.stats.login_failures, 1);
                tracing::warn!(
                    conn.id = self.id,
                    phone,
                    device,
                    "login refused: not a linked device with this noise key"
                );
                self.send_node(&stanza::failure(401)).await?;
                self.hang_up().await;
                Ok(false)
            }
        }
    }

    async fn serve_stanzas(&mut self, rx: &mut mpsc::Receiver<Command>) -> Result<(), ConnError> {
        let idle = self.sim.config.idle_timeout;
        let mut idle_deadline = Instant::now() + idle;
        loop {
            tokio::select! {
                message = self.socket.recv() => {
                    idle_deadline = Instant::now() + idle;
                    for node in self.receive(message)? {
                        self.on_node(node).await?;
                    }
                }
                command = rx.recv() => match command {
                    Some(Command::Send(node)) => self.send_node(&node).await?,
                    Some(Command::Request(node, answer)) => {
                        if let Some(id) = stanza::attr(&node, "id") {
                            self.waiters.insert(id, answer);
                        }
                        self.send_node(&node).await?;
                    }
                    Some(Command::StreamError(node)) => {
                        self.send_node(&node).await?;
                        self.hang_up().await;
                        return Ok(());
                    }
                    Some(Command::Drop) | None => return Ok(()),
                },
                () = sleep_until(idle_deadline) => return Err(ConnError::Timeout),
                () = self.sim.shutdown.cancelled() => return Ok(()),
            }
        }
    }

    /// Decrypts and decodes every complete frame of one websocket message.
    fn receive(
        &mut self,
        message: Option<Result<Message, axum::Error>>,
    ) -> Result<Vec<Node>, ConnError> {
        let data = match message {
            Some(Ok(Message::Binary(data))) => data,
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => return Ok(Vec::new()),
            Some(Ok(Message::Text(_))) => return Err(ConnError::TextMessage),
            Some(Ok(Message::Close(_))) | None => return Err(ConnError::Closed),
            Some(Err(e)) => return Err(e.into()),
        };
        bump(&self.sim.stats.bytes_in, data.len() as u64);
        self.reader.feed(&data);
        let mut nodes = Vec::new();
        while let Some(mut frame) = self.reader.next_frame()? {
            bump(&self.sim.stats.frames_in, 1);
            let transport = self
                .transport
                .as_mut()
                .expect("handshake finished before stanzas");
            transport.decrypt(&mut frame)?;
            let unpacked = wacore_binary::util::unpack(&frame)?;
            nodes.push(wacore_binary::marshal::unmarshal_ref(&unpacked)?.to_owned());
        }
        Ok(nodes)
    }

    async fn on_node(&mut self, node: Node) -> Result<(), ConnError> {
        match node.tag.as_ref() {
            "message" => {
                let ack = crate::routing::on_message(self, &node);
                return self.send_node(&ack).await;
            }
            "ack" => {
                crate::routing::on_ack(self, &node);
                return Ok(());
            }
            "chatstate" => {
                crate::routing::on_chatstate(self, &node);
                return Ok(());
            }
            _ => {}
        }
        if node.tag == "receipt" {
            self.send_node(&stanza::receipt_ack(&node)).await?;
            if let crate::routing::ReceiptFor::Routed = crate::routing::on_receipt(self, &node) {
                return Ok(());
            }
            // One receipt may stand for several messages (`<list><item id/></list>`).
            let ids: Vec<String> = stanza::attr(&node, "id")
                .into_iter()
                .chain(
                    node.get_optional_child("list")
                        .into_iter()
                        .flat_map(|l| l.get_children_by_tag("item"))
                        .filter_map(|item| stanza::attr(item, "id")),
                )
                .collect();
            match stanza::attr(&node, "type").as_deref() {
                Some("retry") => return self.answer_retry(&node).await,
                Some("peer_msg") => {
                    bump(&self.sim.stats.peer_receipts, ids.len() as u64);
                    self.note_peer_receipt(&ids);
                }
                Some("hist_sync") => bump(&self.sim.stats.history_sync_receipts, ids.len() as u64),
                _ => {}
            }
            return Ok(());
        }
        if node.tag != "iq" {
            // presence and <ib> need no answer from the service.
            return Ok(());
        }
        match stanza::attr(&node, "type").as_deref() {
            Some("result" | "error") => {
                if let Some(waiter) =
                    stanza::attr(&node, "id").and_then(|id| self.waiters.remove(&id))
                {
                    let _ = waiter.send(node);
                }
                Ok(())
            }
            Some("get" | "set") => {
                for reply in iq::answer(self, &node) {
                    self.send_node(&reply).await?;
                }
                if stanza::attr(&node, "xmlns").as_deref() == Some("passive") {
                    self.welcome().await?;
                }
                Ok(())
            }
            _ => {
                self.send_node(&stanza::iq_error(&node, 400, "bad-request"))
                    .await
            }
        }
    }

    /// After a device's first login the phone sends it its welcome (an app-state key
    /// share and an empty initial history sync), as WhatsApp's phone does; again at each
    /// login until the device acknowledged the key share.
    async fn welcome(&mut self) -> Result<(), ConnError> {
        let Session::Device { phone, device } = &self.session else {
            return Ok(());
        };
        let (phone, device) = (phone.clone(), *device);
        let found = {
            let registry = self.sim.registry();
            registry.phones.get(&phone).and_then(|account| {
                let record = account
                    .devices
                    .get(&device)
                    .filter(|d| !d.key_share_received)?;
                Some((
                    account.identity.clone(),
                    account.primary.registration_id,
                    crate::phone::Bundle::registered(&record.companion, None),
                ))
            })
        };
        let Some((account, registration_id, bundle)) = found else {
            return Ok(());
        };
        let messages = crate::phone::welcome(device);
        let seal = crate::phone::Seal {
            phone: &phone,
            account: &account,
            registration_id,
            device,
            retry: None,
            garble_first: self.sim.take_garbled(),
        };
        let stanzas = match seal.seal(&bundle, &messages).await {
            Ok(stanzas) => stanzas,
            Err(e) => {
                tracing::warn!(
                    conn.id = self.id,
                    phone,
                    device,
                    error = e,
                    "could not seal the phone's welcome; the next login tries again"
                );
                return Ok(());
            }
        };
        {
            let mut registry = self.sim.registry();
            let Some(record) = registry
                .phones
                .get_mut(&phone)
                .and_then(|a| a.devices.get_mut(&device))
            else {
                return Ok(());
            };
            record.key_share_id = Some(messages[0].id.clone());
            for message in messages {
                record.sent.push(message);
            }
        }
        for stanza in &stanzas {
            self.send_node(stanza).await?;
            bump(&self.sim.stats.peer_messages, 1);
        }
        Ok(())
    }

    /// A device's receipt for messages of the phone's: the key share it acknowledges
    /// counts as delivered.
    fn note_peer_receipt(&self, ids: &[String]) {
        let Session::Device { phone, device } = &self.session else {
            return;
        };
        let mut registry = self.sim.registry();
        if let Some(record) = registry
            .phones
            .get_mut(phone)
            .and_then(|a| a.devices.get_mut(device))
        {
            if record
                .key_share_id
                .as_ref()
                .is_some_and(|id| ids.contains(id))
            {
                record.key_share_received = true;
            }
        }
    }

    /// A device could not decrypt a message of the phone's: it is sealed again, with the
    /// same id, over a new session (from the keys in the receipt, else from what the
    /// device registered and uploaded).
    async fn answer_retry(&mut self, receipt: &Node) -> Result<(), ConnError> {
        let Session::Device { phone, device } = &self.session else {
            return Ok(());
        };
        let (phone, device) = (phone.clone(), *device);
        bump(&self.sim.stats.retry_receipts, 1);
        let refuse = |why: &str| {
            tracing::warn!(phone, device, why, "retry receipt not answered");
        };
        let id = stanza::attr(receipt, "id").unwrap_or_default();
        let count = receipt
            .get_optional_child("retry")
            .and_then(|r| stanza::attr(r, "count"))
            .and_then(|c| c.parse::<u32>().ok())
            .unwrap_or(1);
        if count > MAX_RETRIES {
            refuse("the device asked more than 5 times");
            return Ok(());
        }
        let offered = match crate::phone::Bundle::from_retry(receipt) {
            Ok(offered) => offered,
            Err(why) => {
                refuse(why);
                return Ok(());
            }
        };
        let found = {
            let mut registry = self.sim.registry();
            registry.phones.get_mut(&phone).and_then(|account| {
                let (identity, registration_id) =
                    (account.identity.clone(), account.primary.registration_id);
                let record = account.devices.get_mut(&device)?;
                let message = record.sent.retried(&id);
                let bundle = match offered {
                    Some(bundle) => Ok(bundle),
                    None => Err(record.prekeys.pop_first()),
                }
                .unwrap_or_else(|prekey| {
                    crate::phone::Bundle::registered(&record.companion, prekey)
                });
                let same_identity = bundle.identity() == &record.companion.identity;
                Some((identity, registration_id, message, bundle, same_identity))
            })
        };
        let Some((account, registration_id, message, bundle, same_identity)) = found else {
            refuse("not a linked device");
            return Ok(());
        };
        let message = match message {
            Some((_, asked)) if asked > MAX_RETRIES => {
                refuse("the device asked more than 5 times for this message");
                return Ok(());
            }
            Some((message, _)) => message,
            None => {
                refuse("the phone sent no such message");
                return Ok(());
            }
        };
        if !same_identity {
            refuse("the receipt's identity key is not the one the device registered");
            return Ok(());
        }
        let seal = crate::phone::Seal {
            phone: &phone,
            account: &account,
            registration_id,
            device,
            retry: Some(count),
            garble_first: false,
        };
        match seal.seal(&bundle, std::slice::from_ref(&message)).await {
            Ok(stanzas) => {
                for stanza in &stanzas {
                    self.send_node(stanza).await?;
                }
                bump(&self.sim.stats.peer_messages, 1);
                bump(&self.sim.stats.resent_messages, 1);
            }
            Err(e) => refuse(&e),
        }
        Ok(())
    }

    /// After a last word (a stream error, a login failure) the client hangs up itself
    /// once it has read it; the service closes the socket only if it does not within
    /// a moment. Closing at once can reach a client before the last word does (Baileys
    /// then sees a plain close instead of the 515 that asks it to reconnect).
    async fn hang_up(&mut self) {
        let _ = timeout(LAST_WORD, async {
            while let Some(Ok(message)) = self.socket.recv().await {
                if matches!(message, Message::Close(_)) {
                    break;
                }
            }
        })
        .await;
        let _ = self.socket.send(Message::Close(None)).await;
    }

    async fn next_raw_frame(&mut self) -> Result<Vec<u8>, ConnError> {
        loop {
            if let Some(frame) = self.reader.next_frame()? {
                return Ok(frame);
            }
            match self.socket.recv().await {
                Some(Ok(Message::Binary(data))) => {
                    bump(&self.sim.stats.bytes_in, data.len() as u64);
                    self.reader.feed(&data);
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(Message::Text(_))) => return Err(ConnError::TextMessage),
                Some(Ok(Message::Close(_))) | None => return Err(ConnError::Closed),
                Some(Err(e)) => return Err(e.into()),
            }
        }
    }

    async fn send_raw(&mut self, bytes: Vec<u8>) -> Result<(), ConnError> {
        bump(&self.sim.stats.frames_out, 1);
        bump(&self.sim.stats.bytes_out, bytes.len() as u64);
        self.socket.send(Message::Binary(bytes.into())).await?;
        Ok(())
    }

    pub(crate) async fn send_node(&mut self, node: &Node) -> Result<(), ConnError> {
        let mut plaintext = marshal(node)?;
        let transport = self
            .transport
            .as_mut()
            .expect("handshake finished before stanzas");
        transport.encrypt(&mut plaintext)?;
        self.send_raw(encode_frame(&plaintext)).await
    }
}

/// Checks what a registering companion claims: a 32-byte identity key that signed its
/// signed prekey, the key type WhatsApp uses, and device properties.
fn check_registration(
    data: &wa::client_payload::DevicePairingRegistrationData,
    client_static: &[u8; 32],
) -> Result<Companion, ConnError> {
    let bad = |what: &str| ConnError::Payload(format!("registration data: {what}"));
    if data.e_keytype.as_deref() != Some(&[5][..]) {
        return Err(bad("key type is not Curve25519"));
    }
    let identity = data
        .e_ident
        .as_deref()
        .and_then(crate::key32)
        .ok_or_else(|| bad("identity key"))?;
    let prekey = data
        .e_skey_val
        .as_deref()
        .and_then(crate::key32)
        .ok_or_else(|| bad("signed prekey"))?;
    let signature = data
        .e_skey_sig
        .as_deref()
        .filter(|s| s.len() == 64)
        .ok_or_else(|| bad("prekey signature"))?;
    let identity_key =
        PublicKey::from_djb_public_key_bytes(&identity).map_err(|_| bad("identity key"))?;
    let mut signed = vec![5u8];
    signed.extend_from_slice(&prekey);
    if !identity_key.verify_signature(&signed, signature) {
        return Err(bad("the signed prekey's signature does not verify"));
    }
    let registration_id = data
        .e_regid
        .as_deref()
        .and_then(|r| <[u8; 4]>::try_from(r).ok())
        .map(u32::from_be_bytes)
        .ok_or_else(|| bad("registration id"))?;
    let signed_prekey_id = data
        .e_skey_id
        .as_deref()
        .filter(|id| id.len() == 3)
        .map(|id| u32::from_be_bytes([0, id[0], id[1], id[2]]))
        .ok_or_else(|| bad("signed prekey id"))?;
    let props = data
        .device_props
        .as_deref()
        .map(wa::DeviceProps::decode_from_slice)
        .transpose()
        .map_err(|_| bad("device properties"))?
        .unwrap_or_default();
    Ok(Companion {
        noise: *client_static,
        identity,
        platform: props.os.unwrap_or_else(|| "unknown".to_owned()),
        registration: Registration {
            id: registration_id,
            signed_prekey_id,
            signed_prekey: prekey,
            signature: signature.to_vec(),
        },
    })
}

/// How long a client has to hang up after the service's last word.
const LAST_WORD: Duration = Duration::from_secs(2);

/// A device asks again at most this many times for one message (both clients stop there).
const MAX_RETRIES: u32 = 5;

/// How long the service waits for a companion's answer to an iq it sent.
pub(crate) const ANSWER_TIMEOUT: Duration = Duration::from_secs(15);
