//! Fuzzing the parsers that read bytes from the network, with proptest on stable:
//! the frame decoder, SOCKS-form addresses, Settings, padding schemes and the UDP-over-
//! TCP codec. Every input must give an answer (a value, "need more", or an error),
//! never a panic, an overrun or a buffer that grows beyond what the input declares.
//!
//! Bounded for CI: `FUZZ_CASES` cases per property (default 2,000; the whole file
//! takes a few seconds in a debug build). Run longer with e.g. `FUZZ_CASES=200000`.

use bytes::{BufMut, BytesMut};
use proptest::prelude::*;
use rand::SeedableRng;
use rand::rngs::StdRng;

use anytls_rs::proto::frame::{Command, HEADER_LEN};
use anytls_rs::proto::padding::Piece;
use anytls_rs::proto::udp::{Framing, PacketDecoder, RequestDecoder, packet_bytes};
use anytls_rs::proto::{Address, Decoder, Frame, FrameDecoder, PaddingScheme, Settings};

fn config() -> ProptestConfig {
    let cases = std::env::var("FUZZ_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(2_000);
    ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() }
}

/// Bytes that look like frames more often than uniform noise would: a valid header
/// with a random command and a length that may or may not match what follows.
fn frame_ish() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..2048),
        (any::<u8>(), any::<u32>(), any::<u16>(), proptest::collection::vec(any::<u8>(), 0..1024)).prop_map(
            |(cmd, sid, len, data)| {
                let mut out = vec![cmd];
                out.extend_from_slice(&sid.to_be_bytes());
                out.extend_from_slice(&(len % 1500).to_be_bytes());
                out.extend_from_slice(&data);
                out
            }
        ),
    ]
}

/// Address-ish bytes: a plausible type byte, then noise.
fn address_ish() -> impl Strategy<Value = Vec<u8>> {
    (prop_oneof![Just(1u8), Just(3u8), Just(4u8), any::<u8>()], proptest::collection::vec(any::<u8>(), 0..300))
        .prop_map(|(atyp, rest)| {
            let mut out = vec![atyp];
            out.extend_from_slice(&rest);
            out
        })
}

proptest! {
    #![proptest_config(config())]

    /// Fed in arbitrary pieces, the decoder takes exactly header + declared length per
    /// frame, never more than it was given, and reserves no more than one frame needs.
    #[test]
    fn frame_decoder_consumes_exactly_what_frames_declare(
        input in frame_ish(),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..6),
    ) {
        let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(input.len() + 1)).collect();
        cuts.push(input.len());
        cuts.sort_unstable();
        let mut decoder = FrameDecoder::new();
        let mut buf = BytesMut::new();
        let (mut fed, mut consumed) = (0, 0);
        for cut in cuts {
            buf.extend_from_slice(&input[fed..cut]);
            fed = cut;
            while let Ok(Some(frame)) = decoder.decode(&mut buf) {
                consumed += HEADER_LEN + frame.data.len();
            }
            prop_assert_eq!(consumed + buf.len(), fed);
            prop_assert!(buf.capacity() <= fed.max(64) + HEADER_LEN + u16::MAX as usize + 64);
        }
        if buf.len() >= HEADER_LEN {
            let declared = u16::from_be_bytes([buf[5], buf[6]]) as usize;
            prop_assert!(buf.len() < HEADER_LEN + declared, "a complete frame was left undecoded");
        }
    }

    /// Frames we encode decode to themselves, whatever the command byte.
    #[test]
    fn frames_round_trip(cmd in any::<u8>(), sid in any::<u32>(), data in proptest::collection::vec(any::<u8>(), 0..3000)) {
        let frame = Frame::new(Command::from_byte(cmd), sid, data.clone());
        let mut buf = BytesMut::new();
        frame.encode(&mut buf).unwrap();
        let Ok(decoded) = FrameDecoder::new().decode(&mut buf);
        let decoded = decoded.expect("a whole frame");
        prop_assert_eq!(decoded.command.to_byte(), cmd);
        prop_assert_eq!(decoded.stream_id, sid);
        prop_assert_eq!(&decoded.data[..], &data[..]);
        prop_assert!(buf.is_empty());
    }

    /// Any bytes: an address with its length, "need more", or an error. A decoded
    /// address re-encodes to the bytes it came from, and a prefix of it needs more.
    #[test]
    fn address_decode_is_total_and_consistent(input in address_ish()) {
        if let Ok(Some((address, used))) = Address::decode_prefix(&input) {
            prop_assert!(used <= input.len());
            let mut again = BytesMut::new();
            address.encode(&mut again);
            prop_assert_eq!(&again[..], &input[..used]);
            prop_assert_eq!(Address::decode_prefix(&input[..used - 1]).ok(), Some(None));
        }
    }

    /// Settings: any bytes parse; what we encode parses back.
    #[test]
    fn settings_parse_is_total_and_round_trips(
        noise in proptest::collection::vec(any::<u8>(), 0..512),
        pairs in proptest::collection::btree_map("[a-z-]{1,10}", "[ -<>-~]{0,20}", 0..6),
    ) {
        let _ = Settings::parse(&noise).version();
        let mut settings = Settings::new();
        for (key, value) in &pairs {
            settings = settings.with(key, value);
        }
        let parsed = Settings::parse(&settings.encode());
        for (key, value) in &pairs {
            prop_assert_eq!(parsed.get(key), Some(value.as_str()));
        }
    }

    /// Padding schemes: any text parses or is rejected; an accepted scheme's plans
    /// carry every payload byte exactly once and only frame-sized Waste.
    #[test]
    fn padding_schemes_parse_or_fail_and_plans_carry_the_payload(
        lines in proptest::collection::vec("(stop=[0-9]{1,2}|[0-9]{1,2}=([0-9]{1,5}-[0-9]{1,5}|c|x)(,([0-9]{1,5}-[0-9]{1,5}|c))*|[ -~]{0,12})", 0..8),
        noise in proptest::collection::vec(any::<u8>(), 0..256),
        payload_len in 0usize..70_000,
        seed in any::<u64>(),
    ) {
        let _ = PaddingScheme::parse(&noise);
        if let Ok(scheme) = PaddingScheme::parse(lines.join("\n").as_bytes()) {
            let mut rng = StdRng::seed_from_u64(seed);
            for index in 0..scheme.stop().min(8) {
                let plan = scheme.plan(index, payload_len, &mut rng);
                let carried: usize = plan.iter().map(|piece| match *piece {
                    Piece::Payload(n) => n,
                    Piece::PayloadThenWaste { payload, .. } => payload,
                    Piece::Waste(_) => 0,
                }).sum();
                prop_assert_eq!(carried, payload_len);
                for piece in plan {
                    if let Piece::Waste(n) | Piece::PayloadThenWaste { waste: Some(n), .. } = piece {
                        prop_assert!(n <= u16::MAX as usize);
                    }
                }
            }
        }
    }

    /// UDP over TCP: requests and packets from any bytes give an answer; decoding a
    /// stream of packets always makes progress or stops.
    #[test]
    fn udp_codec_is_total(input in proptest::collection::vec(any::<u8>(), 0..1024), connected in any::<bool>()) {
        let mut request = BytesMut::from(&input[..]);
        if let Ok(Some(_)) = RequestDecoder.decode(&mut request) {
            prop_assert!(request.len() < input.len());
        }
        let framing = if connected { Framing::Connected } else { Framing::Addressed };
        let mut buf = BytesMut::from(&input[..]);
        loop {
            let before = buf.len();
            match PacketDecoder::new(framing).decode(&mut buf) {
                Ok(Some(_)) => prop_assert!(buf.len() < before, "a packet consumed nothing"),
                Ok(None) => { prop_assert_eq!(buf.len(), before); break }
                Err(_) => break,
            }
        }
    }

    /// Packets we encode decode to themselves, in both framings.
    #[test]
    fn udp_packets_round_trip(payload in proptest::collection::vec(any::<u8>(), 0..2000), port in any::<u16>(), ip in any::<[u8; 4]>()) {
        let peer = Address::socket((ip, port).into());
        for framing in [Framing::Connected, Framing::Addressed] {
            let bytes = packet_bytes(framing, Some(&peer), &payload).unwrap();
            let mut buf = BytesMut::new();
            buf.put_slice(&bytes);
            let packet = PacketDecoder::new(framing).decode(&mut buf).unwrap().expect("a whole packet");
            prop_assert_eq!(&packet.payload[..], &payload[..]);
            if framing == Framing::Addressed {
                prop_assert_eq!(packet.peer.as_ref(), Some(&peer));
            }
            prop_assert!(buf.is_empty());
        }
    }
}
