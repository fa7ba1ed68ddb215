//! The rumqttc client driver both protocol versions share: [`driven_client!`] expands, in the
//! module that invokes it, to a `Client` over that module's rumqttc types (`AsyncClient`,
//! `Packet`, `Publish`, `QoS`, `SubscribeReasonCode`, …, and a `topic_of` that reads a PUBLISH's topic), so the v3
//! and v5 helpers differ only where the protocols do.

/// Expands to `options`, `Client`, `connect`, `client` and the `Client` methods both versions
/// share, over the rumqttc types imported where it is invoked.
macro_rules! driven_client {
    () => {
        /// Options for `client_id` at `addr`, keep alive 30 s.
        pub fn options(addr: SocketAddr, client_id: &str) -> MqttOptions {
            let mut o = MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
            o.set_keep_alive(Duration::from_secs(30));
            o
        }

        /// A connected client.
        pub struct Client {
            /// The rumqttc handle.
            pub client: AsyncClient,
            events: mpsc::UnboundedReceiver<Result<Event, ConnectionError>>,
            pending: VecDeque<Publish>,
            task: JoinHandle<()>,
        }

        /// Connects and returns the client with its CONNACK.
        pub async fn connect(opts: MqttOptions) -> (Client, ConnAck) {
            let (client, mut eventloop) = AsyncClient::new(opts, 256);
            let (tx, events) = mpsc::unbounded_channel();
            let task = tokio::spawn(async move {
                loop {
                    let r = eventloop.poll().await;
                    let failed = r.is_err();
                    if tx.send(r).is_err() || failed {
                        break;
                    }
                }
            });
            let mut c = Client {
                client,
                events,
                pending: VecDeque::new(),
                task,
            };
            let ack = c
                .next("CONNACK", |p| match p {
                    Packet::ConnAck(a) => Ok(a),
                    p => Err(p),
                })
                .await;
            (c, ack)
        }

        /// Connects a clean-session client.
        pub async fn client(addr: SocketAddr, client_id: &str) -> Client {
            connect(options(addr, client_id)).await.0
        }

        impl Client {
            /// The next incoming packet `pick` accepts; PUBLISHes it passes over are kept for
            /// [`Client::next_publish`].
            pub async fn next<T>(
                &mut self,
                what: &str,
                mut pick: impl FnMut(Packet) -> Result<T, Packet>,
            ) -> T {
                within(what, async {
                    loop {
                        match self.events.recv().await {
                            Some(Ok(Event::Incoming(p))) => match pick(p) {
                                Ok(t) => return t,
                                Err(Packet::Publish(p)) => self.pending.push_back(p),
                                Err(_) => {}
                            },
                            Some(Ok(Event::Outgoing(_))) => {}
                            Some(Err(e)) => {
                                panic!("connection failed while waiting for {what}: {e}")
                            }
                            None => panic!("connection closed while waiting for {what}"),
                        }
                    }
                })
                .await
            }

            /// The next message delivered to this client.
            pub async fn next_publish(&mut self) -> Publish {
                if let Some(p) = self.pending.pop_front() {
                    return p;
                }
                self.next("PUBLISH", |p| match p {
                    Packet::Publish(p) => Ok(p),
                    p => Err(p),
                })
                .await
            }

            /// The next `n` messages as (topic, payload, qos).
            pub async fn publishes(&mut self, n: usize) -> Vec<(String, String, QoS)> {
                let mut out = Vec::new();
                for _ in 0..n {
                    let p = self.next_publish().await;
                    out.push((
                        topic_of(&p),
                        String::from_utf8_lossy(&p.payload).into_owned(),
                        p.qos,
                    ));
                }
                out
            }

            /// Subscribes and waits for the SUBACK; returns its first reason code.
            async fn subscribed(&mut self, filter: &str, qos: QoS) -> SubscribeReasonCode {
                self.client
                    .subscribe(filter, qos)
                    .await
                    .expect("subscribe queued");
                self.next("SUBACK", |p| match p {
                    Packet::SubAck(a) => Ok(a.return_codes[0]),
                    p => Err(p),
                })
                .await
            }

            /// For QoS 1 and 2, waits until the broker has acknowledged what was just published.
            async fn acknowledged(&mut self, qos: QoS) {
                match qos {
                    QoS::AtMostOnce => {}
                    QoS::AtLeastOnce => {
                        self.next("PUBACK", |p| match p {
                            Packet::PubAck(_) => Ok(()),
                            p => Err(p),
                        })
                        .await
                    }
                    QoS::ExactlyOnce => {
                        self.next("PUBCOMP", |p| match p {
                            Packet::PubComp(_) => Ok(()),
                            p => Err(p),
                        })
                        .await
                    }
                }
            }

            /// Sends DISCONNECT and waits until the broker has closed the connection.
            pub async fn disconnect(mut self) {
                self.client.disconnect().await.expect("disconnect queued");
                within("close after DISCONNECT", async {
                    while let Some(Ok(_)) = self.events.recv().await {}
                })
                .await;
                self.task.abort();
            }

            /// Drops the connection without DISCONNECT, like a client that lost its network.
            pub async fn kill(self) {
                self.task.abort();
                let _ = self.task.await;
            }
        }
    };
}
