//! The like state machine: pure logic, no IO.
//!
//! Every path that changes a record (the Redis transition script, the
//! synchronous DB fallback, the job applying events) agrees with this table;
//! the Lua copy in [`crate::cache`] is tested against it.

use std::fmt;

/// The state of one user's relation to one item.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum State {
    /// Neither liked nor disliked (also: never touched).
    #[default]
    None,
    /// Liked.
    Like,
    /// Disliked.
    Dislike,
}

impl State {
    /// The stable integer stored in the DB, Redis and events.
    pub fn code(self) -> i8 {
        match self {
            State::None => 0,
            State::Like => 1,
            State::Dislike => 2,
        }
    }

    /// Parses the stored integer.
    pub fn from_code(code: i64) -> Option<State> {
        match code {
            0 => Some(State::None),
            1 => Some(State::Like),
            2 => Some(State::Dislike),
            _ => None,
        }
    }

    /// Counts contributed by one record in this state: (likes, dislikes).
    fn contribution(self) -> (i64, i64) {
        match self {
            State::None => (0, 0),
            State::Like => (1, 0),
            State::Dislike => (0, 1),
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            State::None => "NONE",
            State::Like => "LIKE",
            State::Dislike => "DISLIKE",
        })
    }
}

/// What a user asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// NONE or DISLIKE -> LIKE.
    Like,
    /// LIKE -> NONE.
    Unlike,
    /// NONE or LIKE -> DISLIKE.
    Dislike,
    /// DISLIKE -> NONE.
    Undislike,
}

impl Action {
    /// The stable integer used on the wire to the Redis script.
    pub fn code(self) -> i8 {
        match self {
            Action::Like => 1,
            Action::Unlike => 2,
            Action::Dislike => 3,
            Action::Undislike => 4,
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Like => "LIKE",
            Action::Unlike => "UNLIKE",
            Action::Dislike => "DISLIKE",
            Action::Undislike => "UNDISLIKE",
        })
    }
}

/// A change of the counts of one item: (likes, dislikes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Delta {
    /// Change of the like count.
    pub likes: i64,
    /// Change of the dislike count.
    pub dislikes: i64,
}

impl Delta {
    /// The count change of moving one record from `from` to `to`; any pair of
    /// states, so the job can derive deltas from what the DB holds.
    pub fn between(from: State, to: State) -> Delta {
        let (fl, fd) = from.contribution();
        let (tl, td) = to.contribution();
        Delta { likes: tl - fl, dislikes: td - fd }
    }

    /// True when nothing changes.
    pub fn is_zero(self) -> bool {
        self.likes == 0 && self.dislikes == 0
    }
}

/// The transition refused by the state table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{action} is not allowed in state {state}")]
pub struct Forbidden {
    /// The state the record was in.
    pub state: State,
    /// The refused action.
    pub action: Action,
}

/// Applies `action` to `state` following DESIGN.md's table.
pub fn transition(state: State, action: Action) -> Result<State, Forbidden> {
    use Action as A;
    use State as S;
    match (state, action) {
        (S::None, A::Like) | (S::Dislike, A::Like) => Ok(S::Like),
        (S::None, A::Dislike) | (S::Like, A::Dislike) => Ok(S::Dislike),
        (S::Like, A::Unlike) | (S::Dislike, A::Undislike) => Ok(S::None),
        _ => Err(Forbidden { state, action }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATES: [State; 3] = [State::None, State::Like, State::Dislike];
    const ACTIONS: [Action; 4] = [Action::Like, Action::Unlike, Action::Dislike, Action::Undislike];

    #[test]
    fn transition_table_matches_design() {
        let allowed = [
            (State::None, Action::Like, State::Like, (1, 0)),
            (State::None, Action::Dislike, State::Dislike, (0, 1)),
            (State::Like, Action::Unlike, State::None, (-1, 0)),
            (State::Like, Action::Dislike, State::Dislike, (-1, 1)),
            (State::Dislike, Action::Undislike, State::None, (0, -1)),
            (State::Dislike, Action::Like, State::Like, (1, -1)),
        ];
        for s in STATES {
            for a in ACTIONS {
                let want = allowed.iter().find(|(fs, fa, _, _)| *fs == s && *fa == a);
                match (transition(s, a), want) {
                    (Ok(to), Some((_, _, want_to, (l, d)))) => {
                        assert_eq!(to, *want_to, "{s} {a}");
                        assert_eq!(Delta::between(s, to), Delta { likes: *l, dislikes: *d });
                    }
                    (Err(e), None) => assert_eq!(e, Forbidden { state: s, action: a }),
                    (got, want) => panic!("{s} {a}: got {got:?}, table says {want:?}"),
                }
            }
        }
    }

    #[test]
    fn state_codes_round_trip_and_reject_unknown() {
        for s in STATES {
            assert_eq!(State::from_code(s.code() as i64), Some(s));
        }
        assert_eq!(State::from_code(3), None);
        assert_eq!(State::from_code(-1), None);
    }
}
