// paho-bench: an independent MQTT load generator on the Eclipse Paho Go client, used once to
// cross-check corvid-bench's figures with a client stack that shares no code with it. It follows
// mqtt-benchmark's method (each publisher sends COUNT messages back to back, waiting for each
// publish token) and adds one subscriber per publisher so delivered msg/s is measured as well.
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"
)

type result struct {
	Clients             int     `json:"clients"`
	Count               int     `json:"count"`
	QoS                 int     `json:"qos"`
	Size                int     `json:"size"`
	Published           int64   `json:"published"`
	Received            int64   `json:"received"`
	PublishSeconds      float64 `json:"publish_s"`
	DeliverSeconds      float64 `json:"deliver_s"`
	PublishMsgsPerSec   float64 `json:"publish_msgs_per_sec"`
	DeliveredMsgsPerSec float64 `json:"delivered_msgs_per_sec"`
}

func connect(broker, id string) (mqtt.Client, error) {
	opts := mqtt.NewClientOptions().AddBroker(broker).SetClientID(id).SetCleanSession(true).
		SetAutoReconnect(false).SetOrderMatters(false).SetKeepAlive(60 * time.Second)
	c := mqtt.NewClient(opts)
	t := c.Connect()
	if !t.WaitTimeout(10*time.Second) || t.Error() != nil {
		return nil, fmt.Errorf("connect %s: %v", id, t.Error())
	}
	return c, nil
}

func main() {
	broker := flag.String("broker", "tcp://127.0.0.1:1883", "broker URI (loopback only)")
	clients := flag.Int("clients", 10, "publisher/subscriber pairs")
	count := flag.Int("count", 10000, "messages per publisher")
	qos := flag.Int("qos", 1, "QoS 0, 1 or 2")
	size := flag.Int("size", 64, "payload bytes")
	wait := flag.Bool("wait", true, "wait for each publish token before the next (mqtt-benchmark's way)")
	prefix := flag.String("topic", "paho-bench", "topic prefix")
	flag.Parse()

	run := fmt.Sprintf("%s/%d", *prefix, os.Getpid())
	payload := make([]byte, *size)
	var received atomic.Int64
	var lastRecv atomic.Int64
	expected := int64(*clients * *count)
	done := make(chan struct{})
	var once sync.Once

	subs := make([]mqtt.Client, *clients)
	for i := range subs {
		c, err := connect(*broker, fmt.Sprintf("pb-%d-s%d", os.Getpid(), i))
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		topic := fmt.Sprintf("%s/%d", run, i)
		t := c.Subscribe(topic, byte(*qos), func(_ mqtt.Client, _ mqtt.Message) {
			lastRecv.Store(time.Now().UnixNano())
			if received.Add(1) == expected {
				once.Do(func() { close(done) })
			}
		})
		if !t.WaitTimeout(10*time.Second) || t.Error() != nil {
			fmt.Fprintln(os.Stderr, "subscribe:", t.Error())
			os.Exit(1)
		}
		subs[i] = c
	}
	pubs := make([]mqtt.Client, *clients)
	for i := range pubs {
		c, err := connect(*broker, fmt.Sprintf("pb-%d-p%d", os.Getpid(), i))
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		pubs[i] = c
	}

	var published atomic.Int64
	var wg sync.WaitGroup
	start := time.Now()
	for i, c := range pubs {
		wg.Add(1)
		go func(i int, c mqtt.Client) {
			defer wg.Done()
			topic := fmt.Sprintf("%s/%d", run, i)
			var last mqtt.Token
			for n := 0; n < *count; n++ {
				last = c.Publish(topic, byte(*qos), false, payload)
				if *wait {
					last.Wait()
				}
				published.Add(1)
			}
			if last != nil {
				last.Wait()
			}
		}(i, c)
	}
	wg.Wait()
	pubDur := time.Since(start)
	select {
	case <-done:
	case <-time.After(30 * time.Second):
	}
	deliverDur := time.Duration(lastRecv.Load() - start.UnixNano())
	for _, c := range append(pubs, subs...) {
		c.Disconnect(100)
	}
	r := result{
		Clients: *clients, Count: *count, QoS: *qos, Size: *size,
		Published: published.Load(), Received: received.Load(),
		PublishSeconds: pubDur.Seconds(), DeliverSeconds: deliverDur.Seconds(),
		PublishMsgsPerSec:   float64(published.Load()) / pubDur.Seconds(),
		DeliveredMsgsPerSec: float64(received.Load()) / deliverDur.Seconds(),
	}
	out, _ := json.Marshal(r)
	fmt.Println(string(out))
}
