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
}
