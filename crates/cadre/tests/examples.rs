//! The examples run to completion: each asserts what it prints (`cargo run --example NAME` runs
//! one by hand).

#[path = "../examples/agents_calling_agents.rs"]
mod agents_calling_agents;
#[path = "../examples/custom_agent.rs"]
mod custom_agent;
#[path = "../examples/reminders.rs"]
mod reminders;
#[path = "../examples/three_nodes.rs"]
mod three_nodes;

#[test]
fn custom_agent() {
    custom_agent::main().unwrap();
}

#[test]
fn three_nodes() {
    three_nodes::main().unwrap();
}

#[test]
fn agents_calling_agents() {
    agents_calling_agents::main().unwrap();
}

#[test]
fn reminders() {
    reminders::main().unwrap();
}
