//! A small reader for the kernel's BTF (`/sys/kernel/btf/vmlinux`), just
//! enough to find where a field lives inside a kernel struct.
//!
//! Rust eBPF programs get no CO-RE relocations, so wgtrace resolves every
//! field offset it needs here, at load time, from the running kernel's own
//! type information, and hands the numbers to the programs.

use std::collections::HashMap;

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum BtfError {
    #[error("not BTF data (bad magic {0:#06x})")]
    BadMagic(u16),
    #[error("BTF data truncated at byte {0}")]
    Truncated(usize),
    #[error("BTF type kind {kind} at type id {id} is not known to wgtrace")]
    UnknownKind { id: u32, kind: u32 },
    #[error("struct {0} is not in the kernel's BTF")]
    NoSuchStruct(String),
    #[error("{owner} has no field {field}")]
    NoSuchField { owner: String, field: String },
    #[error("{0} is a bit-field; wgtrace reads whole bytes only")]
    BitField(String),
}

const BTF_MAGIC: u16 = 0xeb9f;

const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

#[derive(Clone, Debug)]
struct Member {
    name: u32,
    type_id: u32,
    /// Bit offset; with `kind_flag` set, the top 8 bits hold a bit-field size.
    offset: u32,
}

#[derive(Clone, Debug)]
struct Type {
    kind: u32,
    name: u32,
    kind_flag: bool,
    /// Size for sized kinds, the referenced type for modifiers and typedefs.
    size_or_type: u32,
    members: Vec<Member>,
}

/// Parsed BTF: the types and the string table, with structs and unions
/// indexed by name.
pub struct Btf {
    /// Index 0 is `void`; ids are indexes.
    types: Vec<Option<Type>>,
    strings: Vec<u8>,
    aggregates_by_name: HashMap<String, u32>,
}

fn u32_at(data: &[u8], at: usize) -> Result<u32, BtfError> {
    data.get(at..at + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).ok_or(BtfError::Truncated(at))
}

impl Btf {
    pub fn from_sys_fs() -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let path = "/sys/kernel/btf/vmlinux";
        let data = std::fs::read(path).with_context(|| {
            format!("reading {path}: this kernel exposes no BTF (build it with CONFIG_DEBUG_INFO_BTF=y); wgtrace needs it to find kernel struct layouts")
        })?;
        Ok(Self::parse(&data)?)
    }

    pub fn parse(data: &[u8]) -> Result<Self, BtfError> {
        let magic = data.get(0..2).map(|b| u16::from_le_bytes([b[0], b[1]])).ok_or(BtfError::Truncated(0))?;
        if magic != BTF_MAGIC {
            return Err(BtfError::BadMagic(magic));
        }
        let header_len = u32_at(data, 4)? as usize;
        let type_off = u32_at(data, 8)? as usize;
        let type_len = u32_at(data, 12)? as usize;
        let str_off = u32_at(data, 16)? as usize;
        let str_len = u32_at(data, 20)? as usize;
        let type_start = header_len.checked_add(type_off).ok_or(BtfError::Truncated(8))?;
        let type_end = type_start.checked_add(type_len).ok_or(BtfError::Truncated(12))?;
        let str_start = header_len.checked_add(str_off).ok_or(BtfError::Truncated(16))?;
        let str_end = str_start.checked_add(str_len).ok_or(BtfError::Truncated(20))?;
        let strings = data.get(str_start..str_end).ok_or(BtfError::Truncated(str_start))?.to_vec();
        let section = data.get(type_start..type_end).ok_or(BtfError::Truncated(type_start))?;

        let mut types = vec![None];
        let mut at = 0;
        while at < section.len() {
            let name = u32_at(section, at)?;
            let info = u32_at(section, at + 4)?;
            let size_or_type = u32_at(section, at + 8)?;
            at += 12;
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let kind_flag = info >> 31 == 1;
            let mut members = Vec::new();
            let extra = match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION => {
                    for i in 0..vlen {
                        let m = at + i * 12;
                        members.push(Member {
                            name: u32_at(section, m)?,
                            type_id: u32_at(section, m + 4)?,
                            offset: u32_at(section, m + 8)?,
                        });
                    }
                    vlen * 12
                }
                KIND_ENUM => vlen * 8,
                KIND_FUNC_PROTO => vlen * 8,
                KIND_DATASEC | KIND_ENUM64 => vlen * 12,
                2 | 7 | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | 12 | 16 | KIND_TYPE_TAG => 0,
                other => return Err(BtfError::UnknownKind { id: types.len() as u32, kind: other }),
            };
            at += extra;
            if at > section.len() {
                return Err(BtfError::Truncated(type_start + at));
            }
            types.push(Some(Type { kind, name, kind_flag, size_or_type, members }));
        }

        let mut btf = Self { types, strings, aggregates_by_name: HashMap::new() };
        for (id, ty) in btf.types.iter().enumerate() {
            if let Some(ty) = ty
                && (ty.kind == KIND_STRUCT || ty.kind == KIND_UNION)
                && ty.name != 0
            {
                let name = btf.string(ty.name).to_owned();
                // The first definition wins; duplicates of the same name
                // (rare, from different compilation units) share a layout.
                btf.aggregates_by_name.entry(name).or_insert(id as u32);
            }
        }
        Ok(btf)
    }

    fn string(&self, offset: u32) -> &str {
        let rest = self.strings.get(offset as usize..).unwrap_or_default();
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        std::str::from_utf8(&rest[..end]).unwrap_or("")
    }

    fn ty(&self, id: u32) -> Option<&Type> {
        self.types.get(id as usize).and_then(Option::as_ref)
    }

    /// Follows typedefs and qualifiers to the underlying type.
    fn strip(&self, mut id: u32) -> u32 {
        for _ in 0..32 {
            match self.ty(id) {
                Some(t)
                    if matches!(t.kind, KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG) =>
                {
                    id = t.size_or_type;
                }
                _ => break,
            }
        }
        id
    }

    /// Byte offset of `path` (e.g. `["__fl_common", "flowic_mark"]`) inside
    /// `struct NAME`. Members of anonymous structs and unions are found as
    /// if they were direct members, as in C.
    pub fn field_offset(&self, struct_name: &str, path: &[&str]) -> Result<u32, BtfError> {
        let mut current =
            *self.aggregates_by_name.get(struct_name).ok_or_else(|| BtfError::NoSuchStruct(struct_name.to_owned()))?;
        let mut bits = 0u32;
        let mut owner = struct_name.to_owned();
        for field in path {
            let (member_bits, member_type) = self
                .find_member(current, field, 0)
                .ok_or_else(|| BtfError::NoSuchField { owner: owner.clone(), field: (*field).to_owned() })?;
            bits += member_bits;
            current = self.strip(member_type);
            owner = format!("{owner}.{field}");
        }
        if !bits.is_multiple_of(8) {
            return Err(BtfError::BitField(owner));
        }
        Ok(bits / 8)
    }

    fn find_member(&self, aggregate: u32, field: &str, depth: u32) -> Option<(u32, u32)> {
        let ty = self.ty(aggregate)?;
        if depth > 8 || !(ty.kind == KIND_STRUCT || ty.kind == KIND_UNION) {
            return None;
        }
        for member in &ty.members {
            let offset = if ty.kind_flag { member.offset & 0x00ff_ffff } else { member.offset };
            if member.name != 0 && self.string(member.name) == field {
                return Some((offset, member.type_id));
            }
        }
        for member in ty.members.iter().filter(|m| m.name == 0) {
            let offset = if ty.kind_flag { member.offset & 0x00ff_ffff } else { member.offset };
            if let Some((inner, id)) = self.find_member(self.strip(member.type_id), field, depth + 1) {
                return Some((offset + inner, id));
            }
        }
        None
    }

    /// Whether `btf_trace_NAME` exists, i.e. the kernel has a BTF tracepoint
    /// of that name.
    pub fn has_tracepoint(&self, name: &str) -> bool {
        let wanted = format!("btf_trace_{name}");
        self.types.iter().flatten().any(|t| t.kind == KIND_TYPEDEF && self.string(t.name) == wanted)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds BTF bytes from (kind, name, kind_flag, size_or_type, members)
    /// so the parser can be tested without a kernel.
    pub(crate) struct Builder {
        strings: Vec<u8>,
        types: Vec<u8>,
        next_id: u32,
    }

    impl Builder {
        pub(crate) fn new() -> Self {
            Self { strings: vec![0], types: Vec::new(), next_id: 1 }
        }
        fn name(&mut self, s: &str) -> u32 {
            if s.is_empty() {
                return 0;
            }
            let at = self.strings.len() as u32;
            self.strings.extend_from_slice(s.as_bytes());
            self.strings.push(0);
            at
        }
        pub(crate) fn int(&mut self, name: &str, size: u32) -> u32 {
            let n = self.name(name);
            self.push(n, KIND_INT << 24, size, &[(1 << 24) | (size * 8)])
        }
        pub(crate) fn aggregate(&mut self, union: bool, name: &str, size: u32, members: &[(&str, u32, u32)]) -> u32 {
            let n = self.name(name);
            let kind = if union { KIND_UNION } else { KIND_STRUCT };
            let mut extra = Vec::new();
            for (member, type_id, bit_offset) in members {
                extra.push(self.name(member));
                extra.push(*type_id);
                extra.push(*bit_offset);
            }
            self.push(n, (kind << 24) | members.len() as u32, size, &extra)
        }
        pub(crate) fn typedef(&mut self, name: &str, target: u32) -> u32 {
            let n = self.name(name);
            self.push(n, KIND_TYPEDEF << 24, target, &[])
        }
        fn push(&mut self, name: u32, info: u32, size_or_type: u32, extra: &[u32]) -> u32 {
            for word in [name, info, size_or_type].iter().chain(extra) {
                self.types.extend_from_slice(&word.to_le_bytes());
            }
            self.next_id += 1;
            self.next_id - 1
        }
        pub(crate) fn build(&self) -> Vec<u8> {
            let mut out = Vec::new();
            out.extend_from_slice(&BTF_MAGIC.to_le_bytes());
            out.extend_from_slice(&[1, 0]);
            for word in [24u32, 0, self.types.len() as u32, self.types.len() as u32, self.strings.len() as u32] {
                out.extend_from_slice(&word.to_le_bytes());
            }
            out.extend_from_slice(&self.types);
            out.extend_from_slice(&self.strings);
            out
        }
    }

    fn sample() -> Btf {
        let mut b = Builder::new();
        let u32_t = b.int("u32", 4);
        let u8_t = b.int("u8", 1);
        let common = b.aggregate(false, "flowi_common", 16, &[("flowic_oif", u32_t, 0), ("flowic_mark", u32_t, 96)]);
        let ports = b.aggregate(false, "", 4, &[("dport", u32_t, 0), ("sport", u32_t, 16)]);
        let uli = b.aggregate(true, "flowi_uli", 4, &[("ports", ports, 0)]);
        let typedef = b.typedef("flowi_common_t", common);
        b.aggregate(false, "flowi4", 28, &[("__fl_common", typedef, 0), ("saddr", u32_t, 128), ("uli", uli, 192)]);
        // sk_buff-like: a field reachable only through an anonymous union.
        let anon = b.aggregate(true, "", 4, &[("mark", u32_t, 0), ("reserved", u32_t, 0)]);
        b.aggregate(false, "sk_buff", 16, &[("len", u32_t, 0), ("", anon, 64), ("proto", u8_t, 96)]);
        Btf::parse(&b.build()).unwrap()
    }

    #[test]
    fn resolves_nested_and_anonymous_fields() {
        let btf = sample();
        assert_eq!(btf.field_offset("flowi4", &["__fl_common", "flowic_mark"]), Ok(12));
        assert_eq!(btf.field_offset("flowi4", &["saddr"]), Ok(16));
        assert_eq!(btf.field_offset("flowi4", &["uli", "ports", "sport"]), Ok(26));
        assert_eq!(btf.field_offset("sk_buff", &["mark"]), Ok(8));
        assert_eq!(btf.field_offset("sk_buff", &["proto"]), Ok(12));
    }

    #[test]
    fn reports_what_is_missing() {
        let btf = sample();
        assert_eq!(btf.field_offset("nope", &["x"]), Err(BtfError::NoSuchStruct("nope".into())));
        assert_eq!(
            btf.field_offset("flowi4", &["__fl_common", "flowic_dscp"]),
            Err(BtfError::NoSuchField { owner: "flowi4.__fl_common".into(), field: "flowic_dscp".into() })
        );
    }

    #[test]
    fn rejects_garbage_without_panicking() {
        assert_eq!(Btf::parse(&[0, 0]).err(), Some(BtfError::BadMagic(0)));
        let mut bytes = Builder::new().build();
        bytes[12] = 0xff; // type_len beyond the buffer
        assert!(matches!(Btf::parse(&bytes), Err(BtfError::Truncated(_))));
        assert!(Btf::parse(&[]).is_err());
    }
}
