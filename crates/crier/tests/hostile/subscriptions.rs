//! Subscription churn: the gauges come back to where they were.

use serde_json::json;

use crate::bystander::{Bystander, gauges, wait_gauges};
use crate::{NEWS, start};

#[tokio::test]
async fn subscribe_unsubscribe_churn_leaves_the_gauges_where_they_were() {
    const CYCLES: u64 = 300;
    let server = start(&["--max-subscriptions-per-connection", "1000"]).await;
    let by = Bystander::start(&server).await;
    let baseline = gauges(&server).await;
    assert_eq!(baseline, [1.0, 1.0, 1.0]);
    let token = server.token("churner", &["junk:*", NEWS], &[]);
    let mut c = server.client(&token).await;
    // One at a time, including the bystander's channel: the node must keep its broker
    // subscription for the bystander while the churner comes and goes.
    let mut id = 0;
    for i in 0..CYCLES {
        let channel = if i % 3 == 0 { NEWS.to_owned() } else { format!("junk:{}", i % 7) };
        id += 1;
        c.subscribe(&channel, id).await;
        id += 1;
        let ack = c.request(json!({"type":"unsubscribe","channel":channel}), id).await;
        assert_eq!(ack["type"], "ack", "{ack}");
    }
    // Pipelined: many subscribes, then many unsubscribes, without waiting for replies.
    let channels: Vec<String> = (0..200).map(|i| format!("junk:p{i}")).collect();
    for (i, ch) in channels.iter().enumerate() {
        c.send(json!({"type":"subscribe","id":100_000 + i,"channel":ch})).await;
    }
    for (i, ch) in channels.iter().enumerate() {
        c.send(json!({"type":"unsubscribe","id":200_000 + i,"channel":ch})).await;
    }
    let mut acks = 0;
    while acks < 2 * channels.len() {
        let r = c.recv().await;
        if r["type"] == "message" {
            continue; // the churner's NEWS subscriptions may have caught a message
        }
        assert_eq!(r["type"], "ack", "{r}");
        acks += 1;
    }
    wait_gauges(&server, [2.0, 1.0, 1.0]).await;
    // Connections that die while subscribed to many channels.
    for round in 0..10 {
        let mut d = server.client(&token).await;
        for i in 0..50 {
            d.send(json!({"type":"subscribe","id":i,"channel":format!("junk:r{}", (round * 50 + i) % 120)})).await;
        }
        d.subscribe(NEWS, 1000).await; // waits for the replies above (frames are answered in order)
        drop(d);
    }
    drop(c);
    wait_gauges(&server, baseline).await;
    by.finish(&server).await;
}
