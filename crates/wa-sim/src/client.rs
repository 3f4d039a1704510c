//! A client of the control API, for tests and benchmarks that drive wa-sim over HTTP.
//! Methods are named after the routes they call and return what a caller sees: the
//! status code and the JSON body.

use serde_json::{Value, json};

pub struct Control {
    http: reqwest::Client,
    base: String,
}

impl Control {
    /// `base` is [`crate::WaSim::control_url`] (or `http://host:port/control`).
    pub fn new(base: impl Into<String>) -> Self {
        Self {
            http: reqwest::Client::new(),
            base: base.into(),
        }
    }

    pub async fn post(&self, route: &str, body: Value) -> reqwest::Result<(u16, Value)> {
        let response = self
            .http
            .post(format!("{}/{route}", self.base))
            .json(&body)
            .send()
            .await?;
        let status = response.status().as_u16();
        Ok((status, response.json().await?))
    }

    pub async fn get(&self, route: &str) -> reqwest::Result<(u16, Value)> {
        let response = self
            .http
            .get(format!("{}/{route}", self.base))
            .send()
            .await?;
        let status = response.status().as_u16();
        Ok((status, response.json().await?))
    }

    /// The phone scans `qr`; `phone` picks the number (a fresh one otherwise).
    pub async fn scan(&self, qr: &str, phone: Option<&str>) -> reqwest::Result<(u16, Value)> {
        let mut body = json!({ "qr": qr });
        if let Some(phone) = phone {
            body["phone"] = json!(phone);
        }
        self.post("scan", body).await
    }

    pub async fn link_code(&self, phone: &str, code: &str) -> reqwest::Result<(u16, Value)> {
        self.post("link-code", json!({ "phone": phone, "code": code }))
            .await
    }

    /// Cuts every connection and refuses websockets for `seconds`.
    pub async fn outage(&self, seconds: u64) -> reqwest::Result<(u16, Value)> {
        self.post("outage", json!({ "seconds": seconds })).await
    }

    pub async fn devices(&self) -> reqwest::Result<Vec<Value>> {
        let (_, body) = self.get("devices").await?;
        Ok(body.as_array().cloned().unwrap_or_default())
    }

    pub async fn stats(&self) -> reqwest::Result<Value> {
        Ok(self.get("stats").await?.1)
    }

    /// Starts the most-at-once counts (`peakAdmitting`) again from now.
    pub async fn reset_peaks(&self) -> reqwest::Result<Value> {
        Ok(self.post("stats/reset-peaks", json!({})).await?.1)
    }

    /// Creates a contact (a fresh number unless `phone` is given).
    pub async fn create_contact(
        &self,
        phone: Option<&str>,
        name: Option<&str>,
    ) -> reqwest::Result<(u16, Value)> {
        let mut body = json!({});
        if let Some(phone) = phone {
            body["phone"] = json!(phone);
        }
        if let Some(name) = name {
            body["name"] = json!(name);
        }
        self.post("contacts", body).await
    }

    pub async fn contacts(&self) -> reqwest::Result<(u16, Value)> {
        self.get("contacts").await
    }

    /// The contact `phone` sends `text` to the number `to`; `id` forces the message id.
    pub async fn contact_send(
        &self,
        phone: &str,
        to: &str,
        text: &str,
        id: Option<&str>,
    ) -> reqwest::Result<(u16, Value)> {
        let mut body = json!({ "to": to, "text": text });
        if let Some(id) = id {
            body["id"] = json!(id);
        }
        self.post(&format!("contacts/{phone}/send"), body).await
    }

    /// The contact's inbox; with `wait`, once it holds `count` messages (or the wait ends).
    pub async fn inbox(
        &self,
        phone: &str,
        wait: Option<u64>,
        count: Option<usize>,
    ) -> reqwest::Result<(u16, Value)> {
        let mut query = Vec::new();
        if let Some(wait) = wait {
            query.push(format!("wait={wait}"));
        }
        if let Some(count) = count {
            query.push(format!("count={count}"));
        }
        let query = if query.is_empty() {
            String::new()
        } else {
            format!("?{}", query.join("&"))
        };
        self.get(&format!("contacts/{phone}/inbox{query}")).await
    }

    /// The contact reads these messages of its inbox (read receipts to their senders).
    pub async fn read(&self, phone: &str, ids: &[&str]) -> reqwest::Result<(u16, Value)> {
        self.post(&format!("contacts/{phone}/read"), json!({ "ids": ids }))
            .await
    }

    /// Takes the contact offline (it receives nothing) or back online.
    pub async fn set_online(&self, phone: &str, online: bool) -> reqwest::Result<(u16, Value)> {
        let route = if online { "online" } else { "offline" };
        self.post(&format!("contacts/{phone}/{route}"), json!({}))
            .await
    }

    pub async fn contact_outbox(&self, phone: &str) -> reqwest::Result<(u16, Value)> {
        self.get(&format!("contacts/{phone}/outbox")).await
    }

    pub async fn contact_events(&self, phone: &str) -> reqwest::Result<(u16, Value)> {
        self.get(&format!("contacts/{phone}/events")).await
    }

    /// Arms a fault: `{"kind":"nack","to","code"}` or `{"kind":"garble","contact"}`.
    pub async fn fault(&self, fault: Value) -> reqwest::Result<(u16, Value)> {
        self.post("faults", fault).await
    }
}
