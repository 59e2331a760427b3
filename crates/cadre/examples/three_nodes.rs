//! A three-node cluster in one process: every key has one owner, and a call from any node reaches
//! it. `cargo run --example three_nodes`
use std::time::Duration;

use cadre::prelude::*;
use cadre::Counter;

const SECRET: &str = "three-nodes-example-secret";

#[tokio::main]
pub async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a = Node::builder("a").secret(SECRET).start().await?;
    let b = Node::builder("b").secret(SECRET).seed(a.addr()).start().await?;
    let c = Node::builder("c").secret(SECRET).seed(a.addr()).start().await?;
    for n in [&a, &b, &c] {
        assert!(n.placed(Duration::from_secs(30)).await, "the cluster did not place its shards within 30 s");
    }
    for (i, node) in [&a, &b, &c].into_iter().enumerate() {
        for key in ["x", "y", "z"] {
            let counter = node.agent::<Counter>(key);
            let value = counter.call(Signal::new("counter.add", (i + 1).into())).await?;
            println!("via {}: counter {key} = {value} (owner {})", node.name(), counter.owner()?.unwrap_or_default());
        }
    }
    // Each counter got 1 + 2 + 3, wherever it lives.
    for key in ["x", "y", "z"] {
        let value: i64 = c.agent::<Counter>(key).ask("counter.get", ()).await?;
        assert_eq!(value, 6);
    }
    for n in [c, b, a] {
        n.shutdown().await;
    }
    Ok(())
}
