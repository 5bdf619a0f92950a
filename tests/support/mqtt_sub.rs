//! An MQTT 5 subscriber for the tests: what arrived, with the `inboxd-key` user property.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use inboxd_testbed::Mosquitto;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event as MqttEvent, MqttOptions};

/// Subscribes to `filter` and records (topic, inboxd-key, payload) of what arrives.
pub async fn subscriber(broker: &Mosquitto, filter: &str) -> Arc<Mutex<Vec<(String, String, Vec<u8>)>>> {
    let got = Arc::new(Mutex::new(Vec::new()));
    let tls = broker.url().starts_with("mqtts:");
    let host = if tls { "localhost" } else { "127.0.0.1" };
    let mut options = MqttOptions::new(format!("sub-{}", fastrand::u32(..)), host, broker.port);
    options.set_keep_alive(Duration::from_secs(30));
    if tls {
        options.set_transport(rumqttc::Transport::Tls(rumqttc::TlsConfiguration::Rustls(
            super::tls::client_config(&broker.ca_file()),
        )));
    }
    let (client, mut eventloop) = AsyncClient::new(options, 100);
    client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
    let sink = got.clone();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let mut ready = Some(ready_tx);
    tokio::spawn(async move {
        let _keep = client;
        while let Ok(event) = eventloop.poll().await {
            match event {
                MqttEvent::Incoming(Packet::SubAck(_)) => {
                    if let Some(r) = ready.take() {
                        let _ = r.send(());
                    }
                }
                MqttEvent::Incoming(Packet::Publish(p)) => {
                    let key = p
                        .properties
                        .as_ref()
                        .and_then(|pr| pr.user_properties.iter().find(|(k, _)| k == "inboxd-key"))
                        .map(|(_, v)| v.clone())
                        .unwrap_or_default();
                    sink.lock().unwrap().push((
                        String::from_utf8_lossy(&p.topic).into_owned(),
                        key,
                        p.payload.to_vec(),
                    ));
                }
                _ => {}
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), ready_rx)
        .await
        .unwrap()
        .unwrap();
    got
}
