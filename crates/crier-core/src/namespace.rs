//! Channel namespaces: options per channel-name prefix.
//!
//! A channel's namespace is the part of its name before the first `:` (`chat:lobby` → `chat`).
//! Channels without a `:`, and channels of namespaces nobody declared, get the default policy
//! (the top-level settings). Brokers read a channel's history options from its policy at
//! publish time; sessions read the rest (recovery, presence, join/leave, client publishing).

use std::collections::HashMap;
use std::time::Duration;

/// What a channel gets: the options of its namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChannelPolicy {
    /// Messages kept per channel; 0 = no history (recovery answers `recovered:false`).
    pub history_size: usize,
    /// How long a channel's history is kept after its last publish.
    pub history_ttl: Duration,
    /// Whether a subscribe may recover missed messages (`recover`). Off: `recovered:false`.
    pub recovery: bool,
    /// Whether subscribers are entered in presence (and presence requests answered).
    pub presence: bool,
    /// Whether subscribers receive `join`/`leave` frames.
    pub join_leave: bool,
    /// Whether clients may publish at all (still subject to their token).
    pub client_publish: bool,
    /// Subscribers per channel; 0 = no bound.
    pub max_subscribers: usize,
    /// Whether the backend's subscribe proxy decides subscriptions (instead of the token's
    /// patterns).
    pub subscribe_proxy: bool,
    /// Whether client publishes go through the backend's publish proxy (instead of the token's
    /// patterns; it may rewrite the data).
    pub publish_proxy: bool,
}

impl Default for ChannelPolicy {
    /// Today's behaviour: the settings' defaults.
    fn default() -> ChannelPolicy {
        ChannelPolicy {
            history_size: 100,
            history_ttl: Duration::from_secs(300),
            recovery: true,
            presence: true,
            join_leave: false,
            client_publish: true,
            max_subscribers: 0,
            subscribe_proxy: false,
            publish_proxy: false,
        }
    }
}

/// The declared namespaces and the default policy. Cheap to look up (one hash per call when
/// namespaces are declared, none otherwise).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Namespaces {
    default: ChannelPolicy,
    named: HashMap<Box<str>, ChannelPolicy>,
}

impl Namespaces {
    /// Only the default policy.
    pub fn new(default: ChannelPolicy) -> Namespaces {
        Namespaces { default, named: HashMap::new() }
    }

    /// Declares namespace `name` (replacing an earlier declaration of it).
    pub fn with(mut self, name: &str, policy: ChannelPolicy) -> Namespaces {
        self.named.insert(name.into(), policy);
        self
    }

    /// The namespace part of a channel name, if it has one.
    pub fn namespace_of(channel: &str) -> Option<&str> {
        channel.split_once(':').map(|(ns, _)| ns)
    }

    /// The policy of `channel`.
    pub fn policy(&self, channel: &str) -> &ChannelPolicy {
        if self.named.is_empty() {
            return &self.default;
        }
        Namespaces::namespace_of(channel).and_then(|ns| self.named.get(ns)).unwrap_or(&self.default)
    }

    /// The policy of channels outside every declared namespace.
    pub fn default_policy(&self) -> &ChannelPolicy {
        &self.default
    }

    /// The declared namespaces, in no particular order.
    pub fn named(&self) -> impl Iterator<Item = (&str, &ChannelPolicy)> {
        self.named.iter().map(|(n, p)| (&**n, p))
    }

    /// Every policy: the default one and each namespace's.
    pub fn policies(&self) -> impl Iterator<Item = &ChannelPolicy> {
        std::iter::once(&self.default).chain(self.named.values())
    }

    /// The longest history TTL of any policy (how long a broker may need to keep a channel's keys).
    pub fn max_history_ttl(&self) -> Duration {
        self.policies().map(|p| p.history_ttl).max().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_channel_gets_its_namespace_s_policy_or_the_default() {
        let chat = ChannelPolicy { history_size: 500, join_leave: true, ..ChannelPolicy::default() };
        let ns = Namespaces::new(ChannelPolicy::default()).with("chat", chat.clone());
        assert_eq!(ns.policy("chat:lobby"), &chat);
        assert_eq!(ns.policy("chat:a:b"), &chat);
        assert_eq!(ns.policy("chat"), ns.default_policy(), "no `:`, no namespace");
        assert_eq!(ns.policy("chatty:x"), ns.default_policy());
        assert_eq!(ns.policy("news:x"), ns.default_policy());
        assert_eq!(Namespaces::namespace_of("a:b:c"), Some("a"));
        assert_eq!(Namespaces::namespace_of(":x"), Some(""));
        assert_eq!(ns.max_history_ttl(), Duration::from_secs(300));
    }
}
