//! Conversation affinity: later turns of a conversation go to the node
//! that served the earlier ones, so its Ollama's prompt cache is reused.
//!
//! A turn of `/api/chat` or `/v1/chat/completions` re-sends the earlier
//! messages: the key of a request is a hash chain over the model and its
//! messages, and a later turn finds the earlier one under the chain of its
//! leading messages. `/api/generate` and `/v1/completions` are keyed the
//! same way by their prompt, in blocks of [`PROMPT_BLOCK_BYTES`]. The table
//! holds at most [`AFFINITY_ENTRIES`] conversations, each for
//! [`AFFINITY_TTL`] after its last turn.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

/// Conversations remembered at most.
pub(crate) const AFFINITY_ENTRIES: usize = 8192;
/// How long a conversation stays with its node after its last turn.
pub(crate) const AFFINITY_TTL: Duration = Duration::from_secs(30 * 60);
/// Prompts are compared in blocks of this many bytes.
pub(crate) const PROMPT_BLOCK_BYTES: usize = 64;
/// Most prefixes of one request looked up (its longest ones).
const MAX_PREFIX_LOOKUPS: usize = 128;

type Key = [u8; 32];

/// The parts of a request body a conversation is known by.
#[derive(Deserialize)]
struct Turn<'a> {
    #[serde(borrow, default)]
    messages: Option<Vec<Message<'a>>>,
    #[serde(borrow, default)]
    prompt: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct Message<'a> {
    #[serde(borrow, default)]
    role: Option<&'a RawValue>,
    #[serde(borrow, default)]
    content: Option<&'a RawValue>,
}

/// A request's place in its conversation: what it is remembered under,
/// and the earlier turns' keys it may continue, longest first.
#[derive(Debug, Default)]
pub(crate) struct TurnKeys {
    own: Option<Key>,
    earlier: Vec<Key>,
}

impl TurnKeys {
    /// The keys of `body` for `model`; none when it has no messages or
    /// prompt to go by.
    pub(crate) fn of(model: &str, body: &[u8]) -> Self {
        let Ok(turn) = serde_json::from_slice::<Turn<'_>>(body) else {
            return Self::default();
        };
        let mut chain: Vec<Key> = Vec::new();
        let mut hash: Key = Sha256::digest(model.as_bytes()).into();
        let own = if let Some(messages) = turn.messages {
            for message in &messages {
                let mut h = Sha256::new();
                h.update(hash);
                h.update(message.role.map_or("", RawValue::get));
                h.update([0]);
                h.update(message.content.map_or("", RawValue::get));
                hash = h.finalize().into();
                chain.push(hash);
            }
            // A chat is remembered under all its messages; its earlier
            // turns are the chains of its leading ones.
            chain.pop()
        } else if let Some(prompt) = turn.prompt {
            let text: String = serde_json::from_str(prompt.get()).unwrap_or_default();
            for block in text.as_bytes().chunks_exact(PROMPT_BLOCK_BYTES) {
                hash = Sha256::new()
                    .chain_update(hash)
                    .chain_update(block)
                    .finalize()
                    .into();
                chain.push(hash);
            }
            // A prompt is remembered at its last whole block, which a
            // longer prompt that starts with it also passes.
            chain.last().copied()
        } else {
            None
        };
        let earlier = chain
            .iter()
            .rev()
            .take(MAX_PREFIX_LOOKUPS)
            .copied()
            .collect();
        Self { own, earlier }
    }
}

/// Which node served which conversation, bounded.
#[derive(Debug, Default)]
pub(crate) struct ConversationAffinity(Mutex<Table>);

#[derive(Debug, Default)]
struct Table {
    nodes: HashMap<Key, (String, Instant)>,
    /// Keys in the order they were last remembered (stale duplicates are
    /// skipped when evicting).
    order: VecDeque<(Key, Instant)>,
}

impl ConversationAffinity {
    /// The node that served the turn this one continues, if any.
    pub(crate) fn node_for(&self, keys: &TurnKeys) -> Option<String> {
        let table = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        keys.earlier.iter().find_map(|k| {
            table
                .nodes
                .get(k)
                .filter(|(_, at)| now.duration_since(*at) < AFFINITY_TTL)
                .map(|(node, _)| node.clone())
        })
    }

    /// `node` served the turn with `keys`.
    pub(crate) fn remember(&self, keys: &TurnKeys, node: &str) {
        let Some(own) = keys.own else {
            return;
        };
        let mut table = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        table.nodes.insert(own, (node.to_owned(), now));
        table.order.push_back((own, now));
        while table.nodes.len() > AFFINITY_ENTRIES || table.order.len() > 2 * AFFINITY_ENTRIES {
            let Some((key, at)) = table.order.pop_front() else {
                break;
            };
            if table.nodes.get(&key).is_some_and(|(_, last)| *last == at) {
                table.nodes.remove(&key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(messages: &[(&str, &str)]) -> Vec<u8> {
        let messages: Vec<_> = messages
            .iter()
            .map(|(role, content)| serde_json::json!({"role": role, "content": content}))
            .collect();
        serde_json::json!({"model": "m", "messages": messages})
            .to_string()
            .into_bytes()
    }

    #[test]
    fn a_later_turn_finds_the_node_of_the_earlier_one() {
        let affinity = ConversationAffinity::default();
        let first = TurnKeys::of("m", &chat(&[("system", "be brief"), ("user", "hi")]));
        assert_eq!(affinity.node_for(&first), None);
        affinity.remember(&first, "node-a");
        let second = TurnKeys::of(
            "m",
            &chat(&[
                ("system", "be brief"),
                ("user", "hi"),
                ("assistant", "hello"),
                ("user", "why?"),
            ]),
        );
        assert_eq!(affinity.node_for(&second).as_deref(), Some("node-a"));
        // Another conversation, and the same one with another model.
        let other = TurnKeys::of("m", &chat(&[("system", "be brief"), ("user", "bye")]));
        assert_eq!(affinity.node_for(&other), None);
        assert_eq!(
            affinity.node_for(&TurnKeys::of(
                "n",
                &chat(&[("system", "be brief"), ("user", "hi"), ("user", "x")])
            )),
            None
        );
    }

    #[test]
    fn prompts_continue_by_their_leading_blocks() {
        let affinity = ConversationAffinity::default();
        let story = "once upon a time ".repeat(10);
        let body = |p: &str| {
            serde_json::json!({"model": "m", "prompt": p})
                .to_string()
                .into_bytes()
        };
        let first = TurnKeys::of("m", &body(&story));
        affinity.remember(&first, "node-b");
        let longer = format!("{story} and then the dragon woke up");
        assert_eq!(
            affinity
                .node_for(&TurnKeys::of("m", &body(&longer)))
                .as_deref(),
            Some("node-b")
        );
        assert_eq!(
            affinity.node_for(&TurnKeys::of(
                "m",
                &body("something else entirely, long enough to have a block of its own ...")
            )),
            None
        );
    }

    #[test]
    fn the_table_stays_bounded() {
        let affinity = ConversationAffinity::default();
        for i in 0..(AFFINITY_ENTRIES + 100) {
            let keys = TurnKeys::of("m", &chat(&[("user", &i.to_string())]));
            affinity.remember(&keys, "n");
        }
        let table = affinity.0.lock().unwrap_or_else(PoisonError::into_inner);
        assert!(table.nodes.len() <= AFFINITY_ENTRIES);
        assert!(table.order.len() <= 2 * AFFINITY_ENTRIES);
    }
}
