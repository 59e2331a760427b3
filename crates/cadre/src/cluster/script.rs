//! What the engines' golden scripts share: arguments by key, and a metadata table built
//! command by command (`member`, `shard`).
//!
//! - `member NAME... [noaddr=NAME] [draining=NAME/NAME]`: members at `127.0.0.1:7001`, `:7002`,
//!   ... in admission order, Raft ids 1, 2, ... (`noaddr` gives one no usable address).
//! - `shard N owner=NAME|none epoch=E [replicas=A/B] [out=C] [moving=T] [gen.C=G]`: shard N's
//!   entry (the table grows to hold it). A replica keeps its generation while its in-sync flag
//!   is unchanged and gets a new one when it changes (as the metadata does), unless `gen.NAME`
//!   says.

use std::collections::BTreeMap;
use std::error::Error;

use goldenscript::{Command, Context};

use crate::meta::{MemberRecord, MetaState, Replica, ShardEntry, ShardState};

pub(crate) type Res<T> = Result<T, Box<dyn Error>>;

/// Arguments by key, every one required to be used.
pub(crate) struct Args<'a> {
    keys: BTreeMap<&'a str, &'a str>,
    pub pos: Vec<&'a str>,
}

impl<'a> Args<'a> {
    pub(crate) fn of(c: &'a Command) -> Args<'a> {
        let mut args = c.consume_args();
        let mut keys = BTreeMap::new();
        while let Some((k, v)) = args.next_key() {
            keys.insert(k, v);
        }
        let mut pos = Vec::new();
        while let Some(p) = args.next_pos() {
            pos.push(p);
        }
        Args { keys, pos }
    }

    pub(crate) fn take(&mut self, key: &str) -> Option<&'a str> {
        self.keys.remove(key)
    }

    pub(crate) fn need(&mut self, key: &str) -> Res<&'a str> {
        self.take(key).ok_or_else(|| format!("missing {key}=").into())
    }

    pub(crate) fn num<T: std::str::FromStr>(&mut self, key: &str) -> Res<T>
    where
        T::Err: Error + 'static,
    {
        Ok(self.need(key)?.parse()?)
    }

    /// A `/`-separated list (empty when absent).
    pub(crate) fn list(&mut self, key: &str) -> Vec<&'a str> {
        self.take(key).map(|v| v.split('/').filter(|s| !s.is_empty()).collect()).unwrap_or_default()
    }

    pub(crate) fn flag(&mut self, key: &str) -> Res<bool> {
        Ok(self.take(key).map(str::parse).transpose()?.unwrap_or(false))
    }

    pub(crate) fn done(self) -> Res<()> {
        match self.keys.keys().next() {
            Some(k) => Err(format!("unexpected argument {k}=").into()),
            None => Ok(()),
        }
    }
}

/// An engine's script runner: the table it builds, and its own commands.
pub(crate) trait Script {
    fn table(&mut self) -> &mut MetaState;
    /// A command other than `member` and `shard`.
    fn line(&mut self, name: &str, args: Args) -> Res<String>;
}

/// Runs a [`Script`] under goldenscript, with the table commands of this module.
pub(crate) struct Harness<T>(pub T);

impl<T: Script> goldenscript::Runner for Harness<T> {
    type Command = Command;

    fn run(&mut self, c: &Command, _: &Context) -> Res<String> {
        let a = Args::of(c);
        match c.name.as_str() {
            "member" => member(self.0.table(), a),
            "shard" => shard(self.0.table(), a),
            name => self.0.line(name, a),
        }
    }
}

/// `member NAME... [noaddr=NAME] [draining=NAME/NAME]`.
pub(crate) fn member(st: &mut MetaState, mut a: Args) -> Res<String> {
    let noaddr = a.list("noaddr");
    let draining = a.list("draining");
    for name in a.pos.iter().chain(&noaddr) {
        let n = st.admitted;
        st.admitted += 1;
        let addr = if noaddr.contains(name) { "nowhere".to_string() } else { format!("127.0.0.1:{}", 7001 + n) };
        let record = MemberRecord { addr, admitted: n, draining: draining.contains(name), raft_id: n + 1 };
        st.members.insert(name.to_string(), record);
    }
    for name in &draining {
        st.members.get_mut(*name).ok_or_else(|| format!("no member {name}"))?.draining = true;
    }
    a.pos.clear();
    a.done()?;
    Ok(String::new())
}

/// `shard N owner=NAME|none epoch=E [replicas=A/B] [out=C] [moving=T] [gen.C=G]`.
pub(crate) fn shard(st: &mut MetaState, mut a: Args) -> Res<String> {
    let n: u32 = a.pos.first().ok_or("shard needs its number")?.parse()?;
    let owner = a.need("owner")?;
    let epoch = a.num("epoch")?;
    let (in_sync, out) = (a.list("replicas"), a.list("out"));
    let moving = a.take("moving");
    if st.shards.len() <= n as usize {
        let none = ShardEntry { owner: None, epoch: 0, state: ShardState::Unassigned, replicas: Vec::new() };
        st.shards.resize(n as usize + 1, none);
        st.shard_count = n + 1;
    }
    let old = st.shards[n as usize].clone();
    let mut replicas = Vec::new();
    for (node, flag) in in_sync.iter().map(|r| (r, true)).chain(out.iter().map(|r| (r, false))) {
        let kept = old.replica(node).filter(|r| r.in_sync == flag).map(|r| r.generation);
        let generation = match a.take(&format!("gen.{node}")) {
            Some(g) => g.parse()?,
            None => kept.unwrap_or_else(|| {
                st.generations += 1;
                st.generations
            }),
        };
        replicas.push(Replica { node: node.to_string(), in_sync: flag, generation });
    }
    let owner = (owner != "none").then(|| owner.to_string());
    let state = match (moving, &owner) {
        (Some(to), Some(_)) => ShardState::Moving { to: to.to_string() },
        (None, Some(_)) => ShardState::Active,
        (_, None) => ShardState::Unassigned,
    };
    st.shards[n as usize] = ShardEntry { owner, epoch, state, replicas };
    a.pos.clear();
    a.done()?;
    Ok(String::new())
}

/// One test per script in a folder (`scripts!(RUNNER_EXPR, FOLDER, name, ...)`), and a test that
/// every script in the folder is listed.
macro_rules! scripts {
    ($runner:expr, $folder:expr, $($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                let path = format!("{}/{}", $folder, stringify!($name));
                goldenscript::run(&mut $crate::cluster::script::Harness($runner), &path).expect("the script runs");
            }
        )*

        /// Every script in the folder is run by a test above.
        #[test]
        fn every_script_is_listed() {
            let listed = [$(stringify!($name)),*];
            for file in std::fs::read_dir($folder).expect("the scripts folder") {
                let name = file.expect("an entry").file_name().into_string().expect("a name");
                assert!(listed.contains(&name.as_str()), "add {name} to scripts! in {}", file!());
            }
        }
    };
}
pub(crate) use scripts;
