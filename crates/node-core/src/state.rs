//! The node lifecycle: Initializing → Starting → Running → Stopping → Stopped, or Error.

use std::fmt;

use serde::Serialize;

/// Where a node is in its lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    /// Configuration loaded, identity being prepared.
    Initializing,
    /// Swarm built, listeners opening.
    Starting,
    /// Listening and serving.
    Running,
    /// Closing connections and listeners.
    Stopping,
    /// Stopped cleanly; terminal.
    Stopped,
    /// Failed; terminal.
    Error,
}

/// A transition the lifecycle does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("illegal node state transition {from} -> {to}")]
pub struct StateError {
    /// The current state.
    pub from: NodeState,
    /// The requested state.
    pub to: NodeState,
}

impl NodeState {
    /// All states, in lifecycle order.
    pub const ALL: [Self; 6] = [
        Self::Initializing,
        Self::Starting,
        Self::Running,
        Self::Stopping,
        Self::Stopped,
        Self::Error,
    ];

    /// Whether the lifecycle allows going from `self` to `to`.
    #[must_use]
    pub fn can_become(self, to: Self) -> bool {
        use NodeState::{Error, Initializing, Running, Starting, Stopped, Stopping};
        matches!(
            (self, to),
            (Initializing, Starting)
                | (Starting, Running)
                | (Starting | Running, Stopping)
                | (Stopping, Stopped)
                | (Initializing | Starting | Running | Stopping, Error)
        )
    }

    /// `to` if the lifecycle allows it.
    ///
    /// # Errors
    /// [`StateError`] for a transition the lifecycle does not allow.
    pub fn transition(self, to: Self) -> Result<Self, StateError> {
        if self.can_become(to) {
            Ok(to)
        } else {
            Err(StateError { from: self, to })
        }
    }

    /// Whether no further transition is possible.
    #[must_use]
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Stopped | Self::Error)
    }

    /// Lower-case name, as in metrics and the API.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Initializing => "initializing",
            Self::Starting => "starting",
            Self::Running => "running",
            Self::Stopping => "stopping",
            Self::Stopped => "stopped",
            Self::Error => "error",
        }
    }
}

impl fmt::Display for NodeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::NodeState::*;
    use super::*;

    #[test]
    fn happy_path_is_allowed() {
        let mut s = Initializing;
        for next in [Starting, Running, Stopping, Stopped] {
            s = s.transition(next).unwrap();
        }
        assert!(s.is_terminal());
    }

    #[test]
    fn exactly_the_documented_transitions_are_allowed() {
        let allowed = [
            (Initializing, Starting),
            (Starting, Running),
            (Starting, Stopping),
            (Running, Stopping),
            (Stopping, Stopped),
            (Initializing, Error),
            (Starting, Error),
            (Running, Error),
            (Stopping, Error),
        ];
        for from in NodeState::ALL {
            for to in NodeState::ALL {
                let expected = allowed.contains(&(from, to));
                assert_eq!(from.can_become(to), expected, "{from} -> {to}");
                assert_eq!(from.transition(to).is_ok(), expected);
            }
        }
        let err = Stopped.transition(Running).unwrap_err();
        assert_eq!(
            err.to_string(),
            "illegal node state transition stopped -> running"
        );
    }
}
